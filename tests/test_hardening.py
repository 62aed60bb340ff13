"""Inputs users' tools really write, and bad input on every command: refused in one line, nothing written.

- a checkpoint saved both ways (transformers 5: "TokenizersBackend", nested rope_parameters; Phi-4-mini's
  published layout: "GPT2Tokenizer") exports on every format with Hugging Face's tokens and logits;
- `--docs` never reads through a symbolic link out of the folder unless asked;
- a fresh clone stands alone: nothing is read from outside the repository;
- the table-driven bad-input suite over every CLI command.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO, DEMO_DOCS, ROOT, run_cli
from phiedge import chat, exporters
from phiedge.checks import probes
from phiedge.runtimes import RuntimeSettings, get

TOOLS_MESSAGES = [
    {"role": "system", "content": "Use the tools.", "tools": '[{"name": "get_weather", "parameters": {}}]'},
    {"role": "user", "content": "What's the weather in Paris? <|tool_call|> is a token here."}]
# The cheapest full-precision artifact of each format (the tokenizer path is what is under test here).
CHEAP = {"gguf": "F16", "onnx": "fp32", "openvino": "fp16", "mlx": "fp16"}


# --------------------------------------------------------------------------------- tokenizers, both ways

def test_the_fixture_is_saved_both_ways(tiny):
    """What the two folders say, so the export tests below mean something."""
    tf5 = json.loads((tiny / "model" / "tokenizer_config.json").read_text())
    published = json.loads((tiny / "model-published" / "tokenizer_config.json").read_text())
    assert tf5["tokenizer_class"] == "TokenizersBackend" and (tiny / "model" / "chat_template.jinja").is_file()
    assert published["tokenizer_class"] == "GPT2Tokenizer" and "chat_template" in published
    assert "rope_parameters" in json.loads((tiny / "model" / "config.json").read_text())
    assert "rope_scaling" in json.loads((tiny / "model-published" / "config.json").read_text())


@pytest.mark.parametrize("layout", ["model", "model-published"])
@pytest.mark.parametrize("fmt", sorted(CHEAP))
def test_every_format_exports_a_checkpoint_saved_either_way(tiny, tmp_path, fmt, layout):
    """Export the checkpoint as saved (no merge, no rewriting of its tokenizer files); the artifact's runtime
    tokenizes a tools prompt exactly as Hugging Face does and its short-probe logits match PyTorch's."""
    pytest.importorskip(get(fmt).package)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = tiny / layout
    (art,) = exporters.get(fmt).export(src, tmp_path / "out", [CHEAP[fmt]], {"threads": 2})
    if fmt == "gguf":
        assert art.meta["vocab"] == "gpt2"              # decided from tokenizer.json, whatever the class name says
    hf = AutoTokenizer.from_pretrained(src)
    want = hf.apply_chat_template(TOOLS_MESSAGES, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    rt = get(fmt).load(art.path, RuntimeSettings(threads=2))
    try:
        assert rt.chat_ids(TOOLS_MESSAGES) == want
        (short,) = probes.make(src, None)
        got = rt.logits(short.ids, probes.COMPARE_LAST)
    finally:
        rt.close()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([short.ids])).logits[0, -probes.COMPARE_LAST:].numpy()
    # A wrong vocabulary or template path agrees on almost nothing; MLX on some CPUs flips one near-tie of 64.
    assert (ref.argmax(-1) == got[:, :ref.shape[-1]].argmax(-1)).mean() >= 0.95


def test_vocabulary_path_is_read_from_tokenizer_json(tiny, tmp_path):
    from phiedge.exporters.gguf import decide_vocab
    assert decide_vocab(tiny / "model") == decide_vocab(tiny / "model-published") == "gpt2"
    # A SentencePiece-style tokenizer (Unigram, Metaspace) is left to the converter, which asks for tokenizer.model.
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0)], 0, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert decide_vocab(tmp_path) is None


# ------------------------------------------------------------------------------------ symbolic links

@pytest.fixture
def linked_docs(tmp_path) -> tuple[Path, str]:
    """A docs folder with a link to a file outside it, a link to a folder outside it, and a link inside it."""
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    word = "zanzibarquokka"                      # appears only in the files outside the folder
    (secret / "passwd.txt").write_text(f"root:x:0:0:{word} secret line\n")
    (secret / "notes.md").write_text(f"# Private\n\nThe {word} is a private note.\n")
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(DEMO_DOCS / "phi4-mini-model-card.md", docs / "card.md")
    (docs / "passwd.txt").symlink_to(secret / "passwd.txt")
    (docs / "private").symlink_to(secret)
    (docs / "card-again.md").symlink_to(docs / "card.md")
    return docs, word


@pytest.mark.retriever
def test_links_out_of_the_docs_folder_are_never_read(linked_docs, tmp_path):
    from phiedge.build import calibration_text, docs_digest
    from phiedge.cache import StageCache
    from phiedge.retriever import build_index
    from phiedge.retriever.store import DB_FILE
    docs, word = linked_docs
    res = build_index(docs, tmp_path / "r1")
    skipped = {s.path: s.reason for s in res.skipped}
    assert set(skipped) == {"passwd.txt", "private"} and all("--follow-links" in r for r in skipped.values())
    assert word.encode() not in (tmp_path / "r1" / DB_FILE).read_bytes()
    assert all(word not in t for t in calibration_text(docs))            # data-aware quantization's text
    cache = StageCache(tmp_path / "cache")
    before = docs_digest(cache, docs, False)
    (tmp_path / "elsewhere" / "passwd.txt").write_text("changed\n")       # the stage key never read it
    assert docs_digest(cache, docs, False) == before and "card-again.md" in before
    # Asked for explicitly, the links are followed.
    res = build_index(docs, tmp_path / "r2", follow_links=True)
    assert not res.skipped and word.encode() in (tmp_path / "r2" / DB_FILE).read_bytes()
    r = run_cli("index", str(docs), "--out", str(tmp_path / "r3"))
    assert r.returncode == 0 and "passwd.txt" in r.stdout


# ------------------------------------------------------------------------------------ a fresh clone

def test_no_file_reads_outside_the_repository():
    """The repository names nothing beside it (a user's clone has nothing beside it)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = []
    for rel in tracked:
        if rel.endswith((".py", ".toml", "Makefile", ".cfg", ".sh")) or rel == ".ci/run":
            text = (ROOT / rel).read_text(errors="replace")
            # spelled in pieces, so this file does not name them itself
            for needle in (".." + "/shared", '"shared" / ' + '"seeds"', "shared" + "/seeds", "/work" + "/shared"):
                if needle in text:
                    bad.append(f"{rel}: {needle}")
    assert not bad


def test_the_demo_runs_from_a_fresh_clone(tmp_path):
    """The demo's first stage (the base model, the LoRA trained on demo/docs and the two task adapters) from a
    copy of the tracked files with nothing beside it."""
    clone = tmp_path / "clone" / "phiedge"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked:
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, clone / rel)
    assert sorted(p.name for p in clone.parent.iterdir()) == ["phiedge"]
    env = {**os.environ, "PYTHONPATH": str(clone), "PHIEDGE_FIXTURES": str(tmp_path / "fixtures"),
           "PHIEDGE_DEMO_STEPS": "2", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "scripts/demo.py", "--model-only"], cwd=clone, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    demo = tmp_path / "fixtures" / "smollm2"
    assert (demo / "model" / "config.json").is_file() and (demo / "adapter" / "adapter_model.safetensors").is_file()
    tasks = json.loads((clone / "demo" / "task-adapters.json").read_text())
    assert len(tasks) == 2 and all((demo / "adapters" / t / "adapter_model.safetensors").is_file() for t in tasks)
    # the tokenizer saved beside each, as TRL does: support's template opens with its own system turn
    assert tasks["support"]["system"] in (demo / "adapters" / "support" / "chat_template.jinja").read_text()
    assert chat.load_template(demo / "adapters" / "legal")[0] == chat.load_template(demo / "model")[0]
    assert DEMO["needle"] in (clone / "demo" / "docs" / "phi4-mini-model-card.md").read_text()


# ------------------------------------------------------------------------------------- bad input suite

def _tree_hash(*folders: Path) -> str:
    """Every path with its size and mtime: a command that writes into a folder changes it."""
    h = hashlib.sha256()
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            st = p.lstat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def inputs(tiny, tmp_path_factory) -> dict[str, Path]:
    """User folders the bad inputs are made of (each a real file or folder of the kind named)."""
    d = tmp_path_factory.mktemp("inputs")
    gpt2 = d / "gpt2-model"
    shutil.copytree(tiny / "model", gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    bert = d / "bert-model"
    shutil.copytree(tiny / "model", bert)
    (bert / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertModel"], "model_type": "bert"}))
    badjson = d / "badjson-model"
    shutil.copytree(tiny / "model", badjson)
    (badjson / "config.json").write_text("{ not json")
    adapter_nocfg = d / "adapter-no-config"
    shutil.copytree(tiny / "adapters" / "lora", adapter_nocfg)
    (adapter_nocfg / "adapter_config.json").unlink()
    adapter_badcfg = d / "adapter-bad-config"
    shutil.copytree(tiny / "adapters" / "lora", adapter_badcfg)
    (adapter_badcfg / "adapter_config.json").write_text('{"peft_type": "LORA",')
    ticket = d / "adapter-adds-a-token"           # the tokenizer saved beside it has a token the base does not
    shutil.copytree(tiny / "adapters" / "rslora", ticket)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(ticket / "tokenizer.json"))
    tok.add_special_tokens(["<|ticket|>"])
    tok.save(str(ticket / "tokenizer.json"))
    broken_tok = d / "adapter-broken-tokenizer"
    shutil.copytree(tiny / "adapters" / "rslora", broken_tok)
    (broken_tok / "tokenizer_config.json").write_text('{"chat_template": ')
    (d / "empty").mkdir()
    (d / "a-file.txt").write_text("not a folder\n")
    (d / "only-images").mkdir()
    (d / "only-images" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    (d / "bad.toml").write_text("name = 'bad'\n[[artifacts]\nformat = 'gguf'\n")
    (d / "typo.toml").write_text("name = 'typo'\nthreds = 4\n[[artifacts]]\nformat = 'gguf'\nprecision = 'F16'\n")
    (d / "not-a-bundle").mkdir()
    (d / "not-a-bundle" / "x.txt").write_text("x")
    (d / "bad-manifest").mkdir()
    (d / "bad-manifest" / "manifest.json").write_text("{ truncated")
    (d / "qa.jsonl").write_text('{"question": "q", "needle": "n"}\n{broken\n')
    (d / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    (d / "existing-key").write_text("keep me")
    return {"tiny": tiny, **{p.name: p for p in d.iterdir()}, "root": d}


# (case, argv with {placeholders} for `inputs` and {out}, exit code, words the message contains) -- why each is
# here. Exit 1: a refused input, one "error:" line naming the problem and the fix. Exit 2: click's own usage error.
BUILD = "build --model {tiny}/model --out {out}"
BAD_INPUTS = [
    # build
    ("build-missing-model", "build --model ./no/such/model --out {out}", 1, ["not a directory", "check the path"]),
    ("build-model-is-a-file", "build --model {a-file.txt} --out {out}", 1, ["is a file", "config.json"]),
    ("build-empty-model-folder", "build --model {empty} --out {out}", 1, ["no config.json", "pass a Hugging Face"]),
    ("build-malformed-config", "build --model {badjson-model} --out {out}", 1, ["not valid JSON", "download"]),
    ("build-non-phi-architecture", "build --model {gpt2-model} --out {out}", 1, ["GPT2LMHeadModel", "--model"]),
    ("build-encoder-model", "build --model {bert-model} --out {out}", 1, ["BertModel", "not a causal language model"]),
    ("build-unknown-format", BUILD + " --formats tflite", 1, ["unknown format 'tflite'", "known formats are"]),
    ("build-unknown-precision", BUILD + " --gguf-quant Q3_XS", 1, ["no precision 'Q3_XS'", "known are"]),
    ("build-unknown-target", BUILD + " --target toaster", 1, ["unknown target 'toaster'", "known targets are"]),
    ("build-malformed-target-toml", BUILD + " --target {bad.toml}", 1, ["not valid TOML", "fix the file"]),
    ("build-target-unknown-key", BUILD + " --target {typo.toml}", 1, ["unknown key 'threds'", "known keys"]),
    ("build-threads-zero", BUILD + " --threads 0", 2, ["Invalid value for '--threads'", "Usage:"]),
    ("build-group-size-out-of-choice", BUILD + " --formats mlx --mlx-group-size 48", 2, ["'48' is not one of"]),
    ("build-no-out", "build --model {tiny}/model", 2, ["Missing option '--out'"]),
    ("build-unknown-option", BUILD + " --quantize", 2, ["No such option '--quantize'"]),
    ("build-adapter-without-config", BUILD + " --adapter {adapter-no-config}", 1, ["no adapter_config.json", "PEFT"]),
    ("build-adapter-malformed-config", BUILD + " --adapter {adapter-bad-config}", 1, ["not valid JSON", "copy the adapter"]),
    ("build-adapter-adds-a-token", BUILD + " --adapter {adapter-adds-a-token}", 1,
     ["adds 1 token (<|ticket|>)", "unused rows"]),
    ("build-adapter-broken-tokenizer", BUILD + " --adapter {adapter-broken-tokenizer}", 1,
     ["tokenizer_config.json is not valid JSON", "copy the adapter"]),
    ("build-docs-is-a-file", BUILD + " --docs {a-file.txt}", 1, ["is not a folder", "folder of documents"]),
    ("build-docs-empty-folder", BUILD + " --docs {empty}", 1, ["has no files", "add .md/.txt/.html/.pdf"]),
    ("build-docs-nothing-indexable", BUILD + " --docs {only-images}", 1, ["every file", "skipped", "add .md"]),
    ("build-smoke-without-docs", BUILD + " --smoke-answer 3.8", 1, ["pass them with --docs"]),
    ("build-sign-with-a-bad-key", BUILD + " --sign {key.pem}", 1, ["not an unencrypted private key", "keygen"]),
    ("build-out-is-a-file", "build --model {tiny}/model --out {a-file.txt}", 1, ["is a file", "choose a directory"]),
    ("build-out-not-empty", "build --model {tiny}/model --out {not-a-bundle}", 1, ["not empty", "--force"]),
    # verify / sign / keygen
    ("verify-not-a-bundle", "verify {not-a-bundle}", 1, ["no manifest.json", "phiedge build"]),
    ("verify-missing-folder", "verify {root}/nowhere", 1, ["no manifest.json"]),
    ("verify-malformed-manifest", "verify {bad-manifest}", 1, ["not valid JSON", "rebuild or copy"]),
    ("verify-key-is-not-a-key", "verify {bad-manifest} --key {a-file.txt}", 1, ["not an unencrypted public key",
                                                                                "keygen"]),
    ("keygen-existing-path", "keygen {existing-key}", 1, ["exists", "never overwrites"]),
    ("keygen-missing-folder", "keygen {root}/no/such/dir/key", 1, ["is not a folder", "create it first"]),
    ("sign-not-a-bundle", "sign {not-a-bundle} --key {key.pem}", 1, ["no manifest.json"]),
    ("sign-without-key", "sign {not-a-bundle}", 2, ["Missing option '--key'"]),
    # ask / validate
    ("ask-not-a-bundle", "ask {not-a-bundle} question", 1, ["no manifest.json", "phiedge build"]),
    ("ask-k-negative", "ask {not-a-bundle} question -k -1", 2, ["Invalid value for '-k'"]),
    ("ask-tools-missing", "ask {not-a-bundle} question --tools {root}/none.json", 1, ["none.json does not exist",
                                                                                    "JSON file with a list of tools"]),
    ("ask-no-question", "ask {not-a-bundle}", 2, ["Missing argument 'QUESTION'"]),
    ("validate-not-a-bundle", "validate {not-a-bundle}", 1, ["no manifest.json"]),
    ("validate-threads-negative", "validate {not-a-bundle} --threads -2", 2, ["Invalid value for '--threads'"]),
    # the retriever's commands
    ("index-missing-docs", "index {root}/no-docs --out {out}", 1, ["does not exist", "pass a folder"]),
    ("index-docs-is-a-file", "index {a-file.txt} --out {out}", 1, ["is a file, not a folder"]),
    ("index-empty-docs", "index {empty} --out {out}", 1, ["has no files", "add .md"]),
    ("index-chunk-too-small", "index {empty} --out {out} --chunk-tokens 4", 1, ["too small", "pass 16 or more"]),
    ("search-missing-retriever", "search {root}/nowhere question", 1, ["does not exist", "build it with"]),
    ("search-k-zero", "search {not-a-bundle} question -k 0", 1, ["-k 0", "pass 1 or more"]),
    ("eval-missing-qa", "eval-retrieval {not-a-bundle} --qa {root}/none.jsonl", 1, ["none.jsonl does not exist",
                                                                                    "to --qa"]),
    ("eval-malformed-jsonl", "eval-retrieval {not-a-bundle} --qa {qa.jsonl}", 1, ["qa.jsonl:2: not JSON",
                                                                                 "each line must be"]),
]


@pytest.mark.parametrize("case,argv,code,words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_in_one_line(inputs, tmp_path, case, argv, code, words):
    out = tmp_path / "out"
    names = {**{k: str(v) for k, v in inputs.items()}, "out": str(out)}
    args = re.sub(r"\{([^{}]+)\}", lambda m: names[m.group(1)], argv).split()
    before = _tree_hash(inputs["root"], inputs["tiny"])
    r = run_cli(*args, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == code, (r.returncode, r.stdout[-500:], r.stderr[-1500:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    if code == 1:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "PHIEDGE_DEBUG=1" in errors[0], r.stderr
        message = errors[0]
        assert ":" in message[len("error:"):].rsplit("(set PHIEDGE_DEBUG", 1)[0], "problem: fix"
    else:
        message = r.stderr
        assert "Usage:" in message
    for w in words:
        assert w in message, (w, message)
    assert not out.exists() and not out.with_name("out.partial").exists(), "nothing is created in --out"
    assert _tree_hash(inputs["root"], inputs["tiny"]) == before, "the user's folders are unchanged"
    assert len(BAD_INPUTS) >= 25
