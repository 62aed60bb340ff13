"""The chat template a fine-tune was trained with: an adapter's own tokenizer files (saved beside it, as TRL and
PEFT's examples do) win over the base's in the merged checkpoint and in every format exported from it; files
equal to the base's change nothing; a vocabulary of its own is refused (tests/test_hardening.py's bad inputs).
Kept separate, the template travels with the adapter (tests/test_adapters.py)."""
from __future__ import annotations

import json

import pytest

from conftest import THREADS, installed
from phiedge import chat, exporters, merge, rag, source, tokenizer_files
from phiedge.runtimes import RuntimeSettings, get

CHEAP = {"gguf": "F16", "onnx": "fp32", "openvino": "fp16", "mlx": "fp16"}
MESSAGES = [{"role": "user", "content": "What does the with statement do?"}]


@pytest.fixture(scope="module")
def merged_own_template(tiny, tmp_path_factory):
    """The real merge of rslora, whose tokenizer (saved beside it) opens every conversation with a fixed system
    turn: (merged checkpoint, the merge proof)."""
    model = source.resolve(str(tiny / "model"))
    config = source.check_model(model)
    out = tmp_path_factory.mktemp("own") / "merged"
    proof = merge.merge(model, source.resolve(str(tiny / "adapters" / "rslora"), kind="adapter"), config, out)
    return out, proof


def test_the_adapters_template_wins_in_the_merged_checkpoint(tiny, merged_own_template):
    merged, proof = merged_own_template
    want = chat.load_template(tiny / "adapters" / "rslora")[0]
    assert "You are a support agent for ACME." in want
    assert chat.load_template(merged)[0] == want != chat.load_template(tiny / "model")[0]
    # the vocabulary stays the base's, byte for byte; the record names the adapter
    assert (merged / "tokenizer.json").read_bytes() == (tiny / "model" / "tokenizer.json").read_bytes()
    assert proof.tokenizer == tokenizer_files.record(merged, "adapter") and proof.tokenizer["source"] == "adapter"
    # the gate's references are built from the merged checkpoint: its prompts open with the adapter's turn
    ids = rag.prompt_ids(merged, MESSAGES)
    assert rag.detokenize(merged, ids).startswith("You are a support agent for ACME.")


@pytest.mark.parametrize("fmt", sorted(CHEAP))
def test_every_format_ships_the_adapters_template(merged_own_template, tmp_path, fmt):
    """GGUF's tokenizer.chat_template, the ONNX and MLX folders' tokenizer files, OpenVINO's folder and its
    tokenizer IR: the artifact's own runtime renders the prompt the gate's references were built from."""
    if not installed(fmt):
        pytest.fail(f"{fmt}'s runtime is not installed: make install")
    merged, _ = merged_own_template
    (art,) = exporters.get(fmt).export(merged, tmp_path / fmt, [CHEAP[fmt]], {"threads": int(THREADS)})
    rt = get(fmt).load(art.path, RuntimeSettings(threads=int(THREADS)))
    try:
        assert rt.chat_template == chat.load_template(merged)[0]
        assert rt.chat_ids(MESSAGES) == rag.prompt_ids(merged, MESSAGES)
    finally:
        rt.close()
    if fmt == "openvino":               # what OpenVINO GenAI's own apply_chat_template uses (its tokenizer IR)
        import openvino_genai
        assert "You are a support agent for ACME." in openvino_genai.Tokenizer(str(art.path)).chat_template


def test_an_adapter_whose_tokenizer_files_equal_the_bases_changes_nothing(session, tiny):
    """The session's adapter carries the tokenizer as transformers saved it back (one key more in
    tokenizer_config.json): its merged checkpoint holds the base's files byte for byte, and every artifact's
    record says base."""
    assert tokenizer_files.carries(tiny / "adapters" / "lora")
    merged = session.merged / "merged"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (merged / name).read_bytes() == (tiny / "model" / name).read_bytes(), name
    rows = session.report["artifacts"]
    assert rows and all(r["tokenizer"]["source"] == "base" for r in rows)
    manifest = json.loads((session.bundle / "manifest.json").read_text())
    assert [a["tokenizer"] for a in manifest["artifacts"]] == [r["tokenizer"] for r in rows]
    assert rows[0]["tokenizer"] == tokenizer_files.record(tiny / "model", "base")


def test_a_hub_adapter_downloads_its_tokenizer_files():
    """The patterns huggingface_hub filters a Hub adapter's files with (snapshot_download's allow_patterns) take
    the tokenizer files TRL saves beside it, and no other weights format."""
    from huggingface_hub.utils import filter_repo_objects
    repo = ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "generation_config.json", "README.md",
            "adapter_model.bin", "training_args.bin", "optimizer.pt"]
    got = set(filter_repo_objects(repo, allow_patterns=source.ADAPTER_FILES))
    assert got == set(repo) - {"README.md", "adapter_model.bin", "training_args.bin", "optimizer.pt"}
