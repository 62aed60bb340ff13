"""Publishing: the bundle's README.md is a Hugging Face model card (parsed here with huggingface_hub's own
ModelCard, offline: its remote `validate` calls the Hub), and `phiedge push` plans one repository or one per
format. The upload itself cannot reach the Hub from this machine: the test runs the real code path to the point
where huggingface_hub refuses (HF_HUB_OFFLINE=1) and checks the error is one clear line."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli
from phiedge import card

# The fixture's model is a local folder without a recorded name; its adapter names its base, as PEFT writes it.
BASE = "phiedge/tiny-phi4-mini"


def test_the_bundles_readme_is_a_model_card(session):
    from huggingface_hub import ModelCard
    mc = ModelCard.load(session.bundle / "README.md")
    data = mc.data.to_dict()
    assert data["base_model"] == BASE and data["base_model_relation"] == "quantized"     # Q4_K_M, int4, 4bit, ...
    assert data["library_name"] == "phiedge" and data["pipeline_tag"] == "text-generation"
    assert {"gguf", "onnx", "openvino", "mlx", "lora", "function-calling"} <= set(data["tags"])
    for row in session.report["artifacts"]:
        assert f"| `{row['path']}` |" in mc.text                    # the parity table
    assert "Llama('./gguf-F32/model.gguf'" in mc.text and "ov.LLMPipeline('./openvino-fp16', 'CPU')" in mc.text


def test_push_plans_the_bundle_or_one_repository_per_format(session):
    r = run_cli("push", str(session.bundle), "--repo", "org/name", "--dry-run")
    assert r.returncode == 0, r.stderr
    (whole,) = json.loads(r.stdout)["repos"]
    manifest = json.loads((session.bundle / "manifest.json").read_text())
    assert whole["repo"] == "org/name" and whole["files"] == len(manifest["files"]) + 1
    r = run_cli("push", str(session.bundle), "--repo", "org/name", "--per-artifact", "--dry-run")
    assert r.returncode == 0, r.stderr
    repos = {p["repo"]: p for p in json.loads(r.stdout)["repos"]}
    assert set(repos) == {"org/name-GGUF", "org/name-ONNX", "org/name-OpenVINO", "org/name-MLX"}
    for name, fmt in (("org/name-GGUF", "gguf"), ("org/name-MLX", "mlx")):
        meta = repos[name]["card"]
        assert meta["library_name"] == fmt and meta["base_model"] == BASE
        assert meta["base_model_relation"] == "quantized" and fmt in meta["tags"]


def test_each_repositorys_relation_follows_its_artifacts():
    fp = {"full_precision": True, "format": "gguf"}
    assert card.relation([dict(fp, adapter="lora")]) == "finetune"
    assert card.relation([dict(fp, adapter="lora", adapter_path="adapters/lora/gguf")]) == "adapter"
    assert card.relation([dict(fp, adapter="lora"), dict(fp, full_precision=False)]) == "quantized"
    assert card.relation([fp]) is None                                # the base itself at full precision


def test_the_base_model_is_named_from_what_the_user_has(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/ckpt"}))
    assert card.base_model_id(str(tmp_path), tmp_path, [{"base_model_name_or_path": "org/base"}]) == "org/base"
    assert card.base_model_id(str(tmp_path), tmp_path, [{}]) is None
    assert card.base_model_id(str(tmp_path), tmp_path, [{}], given="org/given") == "org/given"
    assert card.base_model_id("microsoft/Phi-4-mini-instruct", tmp_path, []) == "microsoft/Phi-4-mini-instruct"
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "microsoft/Phi-4-mini-instruct"}))
    assert card.base_model_id(str(tmp_path), tmp_path, []) == "microsoft/Phi-4-mini-instruct"


def test_push_without_the_hub_fails_in_one_line(session):
    r = run_cli("push", str(session.bundle), "--repo", "org/name", env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"})
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: publishing to org/name failed: OfflineModeIsEnabled"), r.stderr
    bad = run_cli("push", str(session.bundle), "--repo", "not a repo")
    assert bad.returncode == 1 and "is not a Hub repository id: pass ORG/NAME" in bad.stderr


@pytest.mark.parametrize("fmt", ["gguf"])
def test_a_bundle_whose_card_names_no_base_is_refused(tiny, tmp_path, fmt):
    """A local model with no recorded name and no adapter: the card has no base_model, push says how to fix it;
    --base-model-id names it."""
    out = tmp_path / "b"
    args = ["build", "--model", str(tiny / "model"), "--formats", fmt, "--gguf-quant", "F16", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    assert run_cli(*args).returncode == 0
    r = run_cli("push", str(out), "--repo", "org/name", "--dry-run")
    assert r.returncode == 1 and "rebuild with --base-model-id ORG/NAME" in r.stderr
    assert run_cli(*args, "--base-model-id", "org/base").returncode == 0
    from huggingface_hub import ModelCard
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["base_model"] == "org/base" and "base_model_relation" not in data     # F16 of the base itself
    assert run_cli("push", str(out), "--repo", "org/name", "--dry-run").returncode == 0


@pytest.mark.parametrize("fmt", ["gguf", "onnx", "openvino", "mlx"])
def test_the_cards_run_lines_run(session, fmt):
    """The card's lines for each format, as a shell runs them in the bundle (the install line aside: the
    runtimes are installed here), on the bundle's first artifact of that format: the runtime loads and answers."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    if not session.rows(fmt):
        pytest.skip(f"no {fmt} artifact in the session build")
    text = (session.bundle / "README.md").read_text()
    block = text.split(f"**{fmt}** (`")[1].split("```")[1].strip().splitlines()
    assert block[0].startswith("pip install")
    venv = str(Path(sys.executable).parent)
    r = subprocess.run(["bash", "-c", "\n".join(block[1:])], cwd=session.bundle, capture_output=True, text=True,
                       env={**os.environ, "PATH": venv + os.pathsep + os.environ["PATH"]}, timeout=600)
    assert r.returncode == 0 and r.stdout.strip(), (r.stdout[-1000:], r.stderr[-2000:])
