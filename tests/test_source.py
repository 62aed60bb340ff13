"""Cheap checks: every bad input is refused before a weight loads, with one line naming the problem and fix."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from conftest import run_cli
from phiedge import errors, source


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, dst / f.name)
    return dst


def _adapter_variant(tiny: Path, tmp: Path, *, config=None, tensors=None, raw: bytes | None = None) -> Path:
    dst = tmp / "adapter"
    dst.mkdir(parents=True)
    cfg = json.loads((tiny / "adapters/lora/adapter_config.json").read_text())
    if config:
        cfg.update(config)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    src = tiny / "adapters/lora/adapter_model.safetensors"
    if raw is not None:
        (dst / "adapter_model.safetensors").write_bytes(raw)
    else:
        t = load_file(src)
        if tensors:
            t = tensors(t)
        save_file(t, dst / "adapter_model.safetensors")
    return dst


def _wrong_width(t: dict) -> dict:
    k = next(k for k in t if "qkv_proj.lora_B" in k)
    t[k] = t[k][:100].copy()           # 100 output rows; base qkv_proj has 1280
    return t


def _other_module(t: dict) -> dict:
    return {k.replace("qkv_proj", "q_proj"): v for k, v in t.items()}


# (case id, adapter variant kwargs, expected error, words the message must contain) -- why each is here:
ADAPTER_CASES = [
    # an adapter trained for a model of another width: caught from the header shapes
    ("wrong-width", dict(tensors=_wrong_width), errors.AdapterMismatchError, ["output rows", "--model"]),
    # an adapter for another architecture (Llama's separate q_proj): module missing in the base
    ("other-arch", dict(tensors=_other_module), errors.AdapterMismatchError, ["q_proj", "--model"]),
    # IA3 and other PEFT types have no merge we prove
    ("ia3", dict(config={"peft_type": "IA3"}), errors.UnsupportedAdapterError, ["IA3", "LoRA"]),
    # LoRA on a tied embedding would untie it: every exporter would ship one of the two
    ("tied-embedding", dict(config={"target_modules": ["qkv_proj", "embed_tokens"]}), errors.UnsupportedAdapterError,
     ["embed_tokens", "tie"]),
    # a header that is not JSON
    ("corrupt", dict(raw=b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"), errors.InvalidCheckpointError,
     ["corrupt", "copy it again"]),
    # fewer bytes than the 8-byte header length
    ("empty", dict(raw=b"abc"), errors.InvalidCheckpointError, ["not a safetensors file"]),
    # the config names Llama's unfused modules, its tensors target Phi's fused qkv_proj: PEFT would end in
    # NoMatchingPeftModuleError after loading the base; one line names what each says and what the base has
    ("config-names-unfused", dict(config={"target_modules": ["q_proj", "v_proj"]}), errors.AdapterMismatchError,
     ["(q_proj, v_proj) match no module of the base", "tensors adapt down_proj, gate_up_proj, o_proj, qkv_proj",
      "has down_proj, gate_up_proj, o_proj, qkv_proj", "target_modules"]),
    # the config lists fewer modules than its tensors adapt: PEFT would silently drop the others
    ("config-misses-tensors", dict(config={"target_modules": ["qkv_proj"]}), errors.AdapterMismatchError,
     ["(qkv_proj) do not cover", "tensors adapt down_proj, gate_up_proj, o_proj, qkv_proj"]),
    # a regex target_modules (PEFT matches it against the whole module path) that selects nothing here
    ("regex-matches-nothing", dict(config={"target_modules": r".*\.(q_proj|v_proj)"}), errors.AdapterMismatchError,
     ["match no module of the base"]),
]


@pytest.mark.parametrize("case,variant,err,words", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_bad_adapter_is_refused_from_headers(tiny, tmp_path, case, variant, err, words):
    model = source.resolve(str(tiny / "model"))
    config = source.check_model(model)
    adapter = source.resolve(str(_adapter_variant(tiny, tmp_path, **variant)), kind="adapter")
    with pytest.raises(err) as e:
        source.check_adapter(adapter, model, config)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_truncated_adapter_is_refused(tiny, tmp_path):
    raw = (tiny / "adapters/lora/adapter_model.safetensors").read_bytes()
    adapter = source.resolve(str(_adapter_variant(tiny, tmp_path, raw=raw[:-1000])), kind="adapter")
    model = source.resolve(str(tiny / "model"))
    with pytest.raises(errors.InvalidCheckpointError, match="truncated"):
        source.check_adapter(adapter, model, source.check_model(model))


def test_good_adapters_pass(tiny, tmp_path):
    model = source.resolve(str(tiny / "model"))
    config = source.check_model(model)
    for kind in ("lora", "rslora", "dora"):
        cfg = source.check_adapter(source.resolve(str(tiny / "adapters" / kind), kind="adapter"), model, config)
        assert cfg["peft_type"] == "LORA"
    # target_modules as PEFT also accepts them: a regex over the module path, and "all-linear"
    for i, target in enumerate([r".*\.(qkv_proj|o_proj|gate_up_proj|down_proj)", "all-linear"]):
        d = _adapter_variant(tiny, tmp_path / str(i), config={"target_modules": target})
        assert source.check_adapter(source.resolve(str(d), kind="adapter"), model, config)["target_modules"] == target


def _model_variant(tiny: Path, dst: Path, **config) -> Path:
    d = _copy_dir(tiny / "model", dst)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(config)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


# (case, config.json changes, words the one-line refusal contains) -- why each is here:
ARCHITECTURE_CASES = [
    # a decoder-only LM of an architecture no exporter is proven on
    ("other-causal-lm", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
     ["GPT2LMHeadModel", "Phi3ForCausalLM", "--model"]),
    # an encoder (BERT): not a causal LM at all
    ("encoder", {"architectures": ["BertForMaskedLM"], "model_type": "bert"},
     ["BertForMaskedLM", "not a causal language model"]),
    # a config.json that names no architecture
    ("no-architecture", {"architectures": []}, ["names no architecture"]),
]


@pytest.mark.parametrize("case,config,words", ARCHITECTURE_CASES, ids=[c[0] for c in ARCHITECTURE_CASES])
def test_unsupported_architectures_are_refused(tiny, tmp_path, case, config, words):
    with pytest.raises(errors.InvalidCheckpointError) as e:
        source.check_model(source.resolve(str(_model_variant(tiny, tmp_path / "m", **config))))
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_non_finite_weights_are_refused_by_name(tiny, tmp_path):
    """NaN/inf in a base tensor: found by the input hashing's one read of every byte, named, remembered with
    the digest (the second build reads nothing and still refuses), never reaching the merge."""
    import numpy as np
    d = tmp_path / "nan-model"
    d.mkdir()
    for f in (tiny / "model").iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, d / f.name)
    t = load_file(tiny / "model" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    t[name] = t[name].copy()
    t[name][3, 5] = np.nan
    save_file(t, d / "model.safetensors")
    args = ["build", "--model", str(d), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    for attempt in range(2):
        r = run_cli(*args)
        assert r.returncode == 1, r.stderr
        line = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(line) == 1 and f"tensor '{name}' in model.safetensors holds NaN or inf" in line[0], r.stderr
        assert "✓ merge" not in r.stderr and "loading" not in r.stderr       # no weight was loaded
    assert not (tmp_path / "out").exists()
    digests = json.loads((tmp_path / "cache" / "digests.json").read_text())
    assert any(v["nonfinite"] == name for v in digests.values())
    from phiedge.cache import scan_safetensors, sha256_file
    sha, bad = scan_safetensors(tiny / "model" / "model.safetensors")
    assert bad is None and sha == sha256_file(tiny / "model" / "model.safetensors")    # same digest as a plain hash


def test_quantized_base_is_refused(tiny, tmp_path):
    d = _copy_dir(tiny / "model", tmp_path / "q")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.InvalidCheckpointError, match="quantized .bitsandbytes.*unquantized"):
        source.check_model(source.resolve(str(d)))


def test_truncated_model_shard_is_refused(tiny, tmp_path):
    d = _copy_dir(tiny / "model", tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").write_bytes((tiny / "model/model.safetensors").read_bytes()[:4096])
    with pytest.raises(errors.InvalidCheckpointError, match="truncated"):
        source.check_model(source.resolve(str(d)))


def test_missing_local_model():
    with pytest.raises(errors.ModelNotFoundError, match="not a directory"):
        source.resolve("./no/such/model")


def test_hub_id_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(errors.ModelNotFoundError) as e:
        source.resolve("microsoft/Phi-4-mini-instruct")
    assert "not in the Hugging Face cache" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)


def test_hub_id_resolves_from_cache_offline(tiny, tmp_path):
    """The real huggingface_hub code path: a cached snapshot resolves offline, with its commit recorded. HF_HOME
    is laid out as the default ~/.cache/huggingface: a `.cache` folder above the snapshot is not a reason to skip
    its files (the full-size bench found phiedge refusing every model under ~/.cache), one inside it is."""
    import subprocess
    import sys
    rev = "0123456789abcdef0123456789abcdef01234567"
    hf_home = tmp_path / ".cache" / "huggingface"
    repo = hf_home / "hub" / "models--phiedge--tiny-phi4-mini"
    _copy_dir(tiny / "model", repo / "snapshots" / rev)
    (repo / "snapshots" / rev / ".cache").mkdir()
    (repo / "snapshots" / rev / ".cache" / "x.safetensors.lock").write_text("")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    code = ("from phiedge import source; s = source.resolve('phiedge/tiny-phi4-mini'); source.check_model(s); "
            "print(s.revision, 'config.json' in s.files, s.path.name, "
            "any(f.endswith('.safetensors') for f in s.files), any('.cache' in f for f in s.files))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [rev, "True", rev, "True", "False"]


def test_non_empty_out_refused_unless_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(errors.OutputExistsError, match="--force"):
        source.prepare_out(tmp_path / "out", force=False)
    source.prepare_out(tmp_path / "out", force=True)
    source.prepare_out(tmp_path / "new", force=False)


def test_disk_space_checked(tmp_path):
    with pytest.raises(errors.DiskSpaceError, match="GB free"):
        source.check_disk([(tmp_path / "a" / "b", 10**18)])
    half = shutil.disk_usage(tmp_path).free * 0.6
    source.check_disk([(tmp_path / "a", int(half))])                      # fits alone
    with pytest.raises(errors.DiskSpaceError):                             # two folders on one disk add up
        source.check_disk([(tmp_path / "a", int(half)), (tmp_path / "b", int(half))])


# CLI: one line on stderr, exit 1, nothing written.
CLI_CASES = [
    # a local path that does not exist
    ("missing-model", ["--model", "./nope/model"], "not a directory"),
    # an unknown format lists the known ones
    ("unknown-format", ["--formats", "tflite"], "known formats are"),
    # an unknown GGUF level lists the known ones
    ("unknown-quant", ["--gguf-quant", "Q3_XS"], "known are"),
    # a smoke fact without documents to ask about
    ("smoke-without-docs", ["--smoke-answer", "3.8"], "pass them with --docs"),
    # two adapters under one name (a bare path is named after its folder)
    ("adapter-name-twice", ["--adapter", "lora=./a", "--adapter", "./b/lora"], "two adapters are named 'lora'"),
    # a name that cannot be a bundle folder
    ("adapter-bad-name", ["--adapter", "./x/my lora"], "cannot name an adapter"),
    # one revision for several adapters
    ("adapter-revision-of-two", ["--adapter", "a=./a", "--adapter", "b=./b", "--adapter-revision", "main"],
     "revision of one adapter"),
    # adapters kept separate, with none given
    ("separate-without-adapter", ["--adapter-mode", "separate"], "no --adapter was given"),
]


@pytest.mark.parametrize("case,args,words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_errors_are_one_line(tiny, tmp_path, case, args, words):
    base = ["build", "--model", str(tiny / "model"), "--out", str(tmp_path / "out")]
    r = run_cli(*base, *args)
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and words in lines[0] and "PHIEDGE_DEBUG=1" in lines[0], r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_cli_existing_out_dir(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    r = run_cli("build", "--model", str(tiny / "model"), "--adapter", str(tiny / "adapters/lora"),
                "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "exists and is not empty" in r.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_help_on_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    commands = [x.split()[0] for x in r.stdout.split("Commands:")[1].splitlines() if x.strip()]
    assert "build" in commands
    for c in commands:
        sub = run_cli(c, "--help")
        assert sub.returncode == 0 and "Usage:" in sub.stdout, c
