"""What every exporter shares: the Artifact record, the Exporter base class, running a tool, finishing an
artifact folder. Exporter modules import from here (not from the package, which is the registry), so a
stage's code fingerprint covers its own exporter and this module only.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..artifact import Artifact  # noqa: F401  (exporters take it from here)
from ..errors import DiskSpaceError, ToolchainError, UsageError
from .grammar import Grammar, Precision

log = logging.getLogger("phiedge.exporters")
# What a tool prints when its disk filled up (errno 28 in C, Python, and the converters' own wording).
DISK_FULL = ("No space left on device", "ENOSPC", "[Errno 28]")


@dataclass(frozen=True)
class CliModifier:
    """A flag that adds one option token to every precision of the format that names none of its group
    (`--mlx-group-size 32` adds `-g32`)."""
    group: str
    token: str          # with {} for the flag's value
    choices: tuple[str, ...]
    help: str


class Exporter:
    """Base class: per-format facts are class constants, the work is `export`."""
    name: ClassVar[str]
    GRAMMAR: ClassVar[Grammar]
    DEFAULT_PRECISION: ClassVar[str]
    CLI_FLAG: ClassVar[str]                     # the build command's precision flag, e.g. --gguf-quant
    CLI_HELP: ClassVar[str]
    CLI_MODIFIERS: ClassVar[dict[str, CliModifier]] = {}
    BYTES_PER_PARAM: ClassVar[dict[str, float]] = {}   # base precision -> output bytes per parameter (disk check)
    # The export's peak memory per parameter of the model, measured on the 3.84 B full-size model (bf16)
    # (phiedge.build.stage_peaks; the build's --max-memory check and its parallel executor read it).
    PEAK_BYTES_PER_PARAM: ClassVar[float] = 2.0
    TOOL_MODULES: ClassVar[tuple[str, ...]] = ()     # child-process modules the export runs (stage fingerprint)

    @property
    def PRECISIONS(self) -> tuple[str, ...]:    # noqa: N802 (read like the other constants)
        return self.GRAMMAR.bases

    def parse(self, precision: str) -> Precision:
        return self.GRAMMAR.parse(precision)

    def check_precisions(self, precisions: list[str]) -> list[str]:
        return self.GRAMMAR.canonical(precisions)

    def estimate_bytes(self, n_params: int, precisions: list[str]) -> int:
        return int(sum(self.BYTES_PER_PARAM.get(self.parse(p).base, 2.0) for p in precisions) * n_params)

    def peak_bytes(self, n_params: int, precision: str) -> int:
        """Memory the export of one precision needs at its peak (the tool's own included), in bytes."""
        return int(self.PEAK_BYTES_PER_PARAM * n_params) + TOOL_BYTES

    def toolchain(self) -> dict[str, str]:
        """Versions of the tools this export runs; ToolchainError naming the install when one is missing."""
        return {}

    def preflight(self, precisions: list[str], *, calibration: bool, settings: dict | None = None) -> list[str]:
        """Every reason this export cannot run here, each one line (empty: it can): a missing toolchain, options
        that need what the build lacks. (Memory is the build's: phiedge.build.stage_peaks.)"""
        problems = []
        try:
            self.toolchain()
        except ToolchainError as e:
            problems.append(str(e))
        return problems + self._needs(precisions, calibration, settings or {})

    # Who applies a LoRA kept separate from this format's base artifacts (--adapter-mode separate), in words for
    # messages; None: this format's adapters cannot be kept separate yet (the build refuses up front).
    ADAPTER_RUNTIME: ClassVar[str | None] = None      # the runtime that applies an adapter kept separate, if any
    ADAPTER_DORA: ClassVar[bool] = False               # whether it applies DoRA's magnitude vectors too
    BASE_SETTINGS: ClassVar[dict] = {}                 # export settings for a base that adapters are applied to

    def export_adapter(self, base_dir: Path, adapter_dir: Path, out_dir: Path) -> tuple[str, ...]:
        """The PEFT adapter in `adapter_dir` as this format's runtime loads it beside a base artifact exported from
        `base_dir`, written into `out_dir`; returns the files written."""
        raise UsageError(f"{self.name} cannot keep an adapter separate from its base yet: build it with "
                         f"--adapter-mode merged")

    # Work every precision of this format starts from (OpenVINO: optimum's traced IR), done once per checkpoint in
    # a stage of its own ("prepare <format>", cached), its folder handed to each precision's export as
    # settings["prepared"]: a build's export stages are one per precision.
    PREPARES: ClassVar[bool] = False

    def prepare_peak_bytes(self, n_params: int) -> int:
        """The prepare stage's peak: the format's own figure, before any precision's compression."""
        return Exporter.peak_bytes(self, n_params, "")

    def prepare(self, checkpoint: Path, out_dir: Path, settings: dict) -> None:
        """Write the shared starting point of this format's exports of `checkpoint` into `out_dir`."""
        raise NotImplementedError

    def calibrates(self, precisions: list[str]) -> bool:
        """Whether exporting these precisions reads calibration text (the build's --docs documents, passed as
        settings["calibration_text"]); only then are the documents part of the export's cache key."""
        return False

    def _needs(self, precisions: list[str], calibration: bool, settings: dict) -> list[str]:
        """Exporter-specific shortfalls of these precisions (e.g. data-aware int4 without --docs)."""
        return []

    def export(self, merged_dir: Path, out_dir: Path, precisions: list[str], settings: dict) -> list[Artifact]:
        raise NotImplementedError

    # The tool's own default 4-bit, as phiedge names it (what `phiedge sweep` measures every variant against), and
    # the variants a sweep builds by default: 4-, 5- and 8-bit, data-free and data-aware.
    TOOL_4BIT: ClassVar[str]
    SWEEP: ClassVar[tuple[str, ...]] = ()

    def tensors(self, art: Artifact) -> list[tuple[str, int]]:
        """(tensor name, bytes stored) of every weight in the artifact, read from its files' headers."""
        raise NotImplementedError

    def weight_bytes(self, art: Artifact) -> dict[str, int]:
        """The artifact's weight bytes as {"embedding": token embedding and LM head, "other": the rest}
        (phiedge.sweep projects sizes to Phi-4-mini's proportions with it)."""
        out = {"embedding": 0, "other": 0}
        for name, n in self.tensors(art):
            out["embedding" if any(k in name for k in EMBEDDING_NAMES) else "other"] += n
        return out

    def finish(self, tmp: Path, dest: Path, precision: str, required: tuple[str, ...], meta: dict,
               what: str) -> Artifact:
        """The one way an artifact folder is completed: every required file is there, `tmp` becomes `dest`
        in one rename, and the Artifact lists what it holds."""
        missing = [f for f in required if not (tmp / f).is_file()]
        if missing:
            raise ToolchainError(f"{what} wrote no {', '.join(missing)} in {tmp}: rerun with PHIEDGE_DEBUG=1")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        files = tuple(sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()))
        art = Artifact(format=self.name, precision=precision, path=dest, files=files, meta=meta)
        log.info("%s %s: %.1f MB%s", self.name, precision, art.size_bytes / 1e6,
                 f" in {meta['export_seconds']:.1f} s, peak {meta['export_peak_rss_mb']:.0f} MB"
                 if "export_seconds" in meta else "")
        return art


# Tensor names of the token embedding and the LM head in the formats' own naming (HF, llama.cpp).
EMBEDDING_NAMES = ("embed_tokens", "lm_head", "token_embd.", "output.weight")
TOOL_BYTES = 300 * 2**20        # a tool's Python process with torch / its runtime imported, before any model


def run_tool(cmd: list[str], what: str) -> dict:
    """Run a tool to completion; its wall time and peak memory, or a ToolchainError with its last line (a
    DiskSpaceError when the tool ran out of disk). The tool dies with the build and shares the writer locks of
    the stage it writes into (phiedge.cache), so no sweep removes its output while it lives."""
    from ..cache import writer_fds
    from ..memory import guarded
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(guarded(cmd), stdout=out, stderr=subprocess.STDOUT, text=True, pass_fds=writer_fds())
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            out.seek(0)
            text = out.read()
            if os.environ.get("PHIEDGE_DEBUG"):
                sys.stderr.write(text)
            tail = [ln for ln in text.strip().splitlines() if ln.strip()]
            why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            if proc.returncode == -9:
                why += ", most likely the kernel's out-of-memory killer: see dmesg"
            full = next((ln.strip() for ln in reversed(tail) if any(m in ln for m in DISK_FULL)), None)
            if full:
                raise DiskSpaceError(f"{what} ran out of disk space ({full})")
            raise ToolchainError(f"{what} failed ({why}): {tail[-1].strip() if tail else 'no output'}; "
                                 f"rerun with PHIEDGE_DEBUG=1 for its full log")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}   # ru_maxrss: KiB


REGISTRY: dict[str, type[Exporter]] = {}


def register(cls: type[Exporter]) -> type[Exporter]:
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> Exporter:
    if name not in REGISTRY:
        raise UsageError(f"unknown format '{name}': known formats are {', '.join(sorted(REGISTRY))}; "
                         f"pass one of them to --formats")
    return REGISTRY[name]()
