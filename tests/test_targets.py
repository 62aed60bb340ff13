"""Device profiles as data: every shipped profile loads; bad ones are refused with the key named."""
from __future__ import annotations

import pytest

from phiedge import exporters, targets
from phiedge.errors import TargetError

REQUIRED = {"apple-silicon", "intel-cpu", "intel-gpu", "intel-npu", "generic-cpu", "arm64-board", "all"}


def test_every_profile_loads_and_the_required_ones_exist():
    names = set(targets.available())
    assert REQUIRED <= names
    for name in names:
        t = targets.load(name)
        assert t.artifacts and t.runtime.threads >= 1
        for a in t.artifacts:       # formats phiedge has must name precisions their exporter knows
            if a.format in exporters.REGISTRY:
                exporters.get(a.format).check_precisions([a.precision])


def test_profiles_say_what_the_issue_asks():
    assert {(a.format, a.precision) for a in targets.load("arm64-board").artifacts} == {("gguf", "Q4_0")}
    assert targets.load("arm64-board").runtime.n_ctx <= 2048
    assert targets.load("intel-npu").runtime.device == "NPU" and targets.load("intel-npu").runtime.fallback == "CPU"
    assert {a.format for a in targets.load("all").artifacts} == {"gguf", "onnx", "openvino", "mlx"}


BAD = [
    # a typo in a key must not be silently ignored
    ("typo-top", 'name = "x"\nartifacts = [{format = "gguf", precision = "Q4_0"}]\nthreds = 4\n', "unknown key 'threds'"),
    ("typo-runtime", 'name = "x"\n[[artifacts]]\nformat = "gguf"\nprecision = "Q4_0"\n[runtime]\nthreads = 2\nctx = 1\n',
     "unknown key 'ctx'"),
    ("typo-artifact", 'name = "x"\n[[artifacts]]\nformat = "gguf"\nquant = "Q4_0"\n', "unknown key 'quant'"),
    # a profile with nothing to build
    ("no-artifacts", 'name = "x"\nartifacts = []\n', "no [[artifacts]]"),
    # wrong types are named with the value
    ("bad-type", 'name = "x"\n[[artifacts]]\nformat = "gguf"\nprecision = "Q4_0"\n[runtime]\nthreads = "four"\n',
     "'threads' must be int"),
    # the file name is the profile's name: two sources of truth would drift
    ("name-mismatch", 'name = "other"\n[[artifacts]]\nformat = "gguf"\nprecision = "Q4_0"\n', "differs from the file name"),
    ("bad-threshold", 'name = "x"\n[[artifacts]]\nformat = "gguf"\nprecision = "Q4_0"\n[thresholds]\nQ4_0 = 0.9\n',
     "must be [top1_min, kl_max]"),
    ("not-toml", 'name = "x\n', "not valid TOML"),
]


@pytest.mark.parametrize("case,text,words", BAD, ids=[b[0] for b in BAD])
def test_bad_profiles_are_refused(tmp_path, case, text, words):
    path = tmp_path / "x.toml"
    path.write_text(text)
    with pytest.raises(TargetError) as e:
        targets.load(str(path))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unknown_target_lists_known():
    with pytest.raises(TargetError, match="known targets are .*generic-cpu"):
        targets.load("raspberry-pi-9")


def test_thresholds_override_the_table(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('name = "x"\n[[artifacts]]\nformat = "gguf"\nprecision = "Q4_0"\n[thresholds]\nQ4_0 = [0.9, 0.1]\n')
    assert targets.load(str(path)).threshold_overrides() == {"Q4_0": (0.9, 0.1, None)}


def test_a_precision_flag_with_a_target_replaces_that_format_or_is_refused():
    """--target picks formats and precisions; a precision flag given with it replaces the profile's precisions
    of that format; a flag or a --formats entry the profile does not have is refused, never ignored."""
    from phiedge.errors import UsageError
    from phiedge.targets import resolve_plan
    plan, profile = resolve_plan("generic-cpu", [], {"gguf": (["Q8_0", "F16"], {})})
    assert plan == {"gguf": ["Q8_0", "F16"], "onnx": ["int4-b128-k_quant-head8"]} and profile.name == "generic-cpu"
    plan, _ = resolve_plan("all", ["gguf"], {})
    assert plan == {"gguf": ["F16", "Q5_K_S"]}
    with pytest.raises(UsageError, match="--ov-weights does not apply: target 'generic-cpu' builds no openvino"):
        resolve_plan("generic-cpu", [], {"openvino": (["int8"], {})})
    with pytest.raises(UsageError, match="--onnx-precision does not apply: target 'all' builds no onnx artifact here"):
        resolve_plan("all", ["gguf"], {"onnx": (["fp32"], {})})
    with pytest.raises(UsageError, match="target 'arm64-board' has no mlx artifact"):
        resolve_plan("arm64-board", ["mlx"], {})
    with pytest.raises(UsageError, match="--gguf-quant is given but gguf is not in --formats"):
        resolve_plan(None, ["onnx"], {"gguf": (["F16"], {})})


def test_every_profile_resolves_to_a_build_plan():
    """Completeness: every targets/*.toml is a plan the CLI can build (each precision is canonical already)."""
    from phiedge.targets import resolve_plan
    for name in targets.available():
        plan, profile = resolve_plan(name, [], {})
        assert plan == {f: p for f, p in profile.plan().items()}, name
