"""OpenVINO-specific behaviour on the session build's OpenVINO artifacts: the device fallback, data-aware int4
needing documents, and the group size that must divide every layer width (the contract common to all runtimes is
tests/test_runtimes.py)."""
from __future__ import annotations

import pytest

from phiedge import errors, exporters
from phiedge.exporters import _ov_export
from phiedge.runtimes import RuntimeSettings, get
from conftest import assert_pytorch_tokens

pytestmark = pytest.mark.openvino


def test_full_precision_smoke_answer_follows_pytorch(session):
    assert_pytorch_tokens(session.row("openvino", "fp16")["smoke"])


def test_device_fallback_is_recorded(session):
    """intel-gpu / intel-npu profiles ask for GPU / NPU with fallback CPU; this machine has only a CPU."""
    import openvino as ov
    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    path = session.artifact("openvino", "int4")
    rt = get("openvino").load(path, RuntimeSettings(device="NPU", extra={"fallback": "CPU"}))
    assert (rt.device, rt.fallback_from) == ("CPU", "NPU")
    assert rt.logits(list(range(1, 9)), 2).shape == (2, 2048)
    rt.close()
    from phiedge import device, targets   # the device path passes the profile's fallback through
    profile = {"target": targets.load("intel-npu").as_dict()}
    rt = get("openvino").load(path, device._settings(profile, 2, cap_context=False))
    assert (rt.device, rt.fallback_from) == ("CPU", "NPU")
    rt.close()
    with pytest.raises(errors.ToolchainError, match="device 'NPU' is not on this machine"):
        get("openvino").load(path, RuntimeSettings(device="NPU", extra={"fallback": None}))
    with pytest.raises(errors.UsageError, match="no device 'TPU': known are CPU, GPU, NPU"):
        get("openvino").load(path, RuntimeSettings(device="TPU"))


def test_data_aware_options_need_documents(tmp_path):
    with pytest.raises(errors.UsageError, match="need calibration text: pass --docs"):
        exporters.get("openvino").export(tmp_path / "unused", tmp_path / "out", ["int4-awq"], {})
    assert not (tmp_path / "out").exists(), "nothing is built before the checks pass"
    exp = exporters.get("openvino")
    assert exp.preflight(["int4-se"], n_params=10**6, available=10**12, calibration=False)
    assert exp.preflight(["int4-se", "int4"], n_params=10**6, available=10**12, calibration=True) == []


def test_group_size_is_lowered_to_one_that_divides():
    assert _ov_export.choose_group_size(128, [3072, 8192]) == 128          # real Phi-4-mini
    assert _ov_export.choose_group_size(128, [576, 1536]) == 64            # SmolLM2-135M (FIELD-NOTES)
    assert _ov_export.choose_group_size(-1, [577]) == -1
