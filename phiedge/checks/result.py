"""The one record of a checked artifact: what it is, what was measured, what the verdict is.

`ArtifactResult` is frozen. The build makes one per artifact; the bundle, manifest, report, CLI table and the
device path read it (as objects or through `to_json`) and never change it. `to_json` is the row schema of
report.json's "artifacts"; `from_json` reads it back (the verdict is re-derived by the pure `judge`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .golden import golden_name, golden_suffix
from .judge import Verdict, judge
from .measure import Answer, Measurement
from .metrics import Limits, TokenAgreement

if TYPE_CHECKING:
    from ..artifact import Artifact


@dataclass(frozen=True)
class ArtifactResult:
    artifact: "Artifact"                 # phiedge.exporters.Artifact: where its files are now
    limits: Limits
    measurement: Measurement
    verdict: Verdict
    # RuntimeSettings.extra it was measured and ships with beyond its own (empty: as exported), and, when those
    # are its runtime's exact settings, why its own failed (phiedge.worker.result_of).
    settings: dict = field(default_factory=dict)
    own_settings_failures: tuple[str, ...] = ()
    # The adapter it was proven with (its --adapter name; None: the base alone) and that variant's suffix
    # (phiedge.build.Variant: "" or "@<adapter>"), which names its golden references and, merged, its folder;
    # separate (--adapter-mode separate), the adapter's runtime file applied to the base artifact at run time.
    adapter: str | None = None
    suffix: str = ""
    adapter_files: "Artifact | None" = None

    @classmethod
    def of(cls, artifact, limits: Limits, measurement: Measurement, *, settings: dict | None = None,
           own_settings_failures: tuple[str, ...] | list[str] = (), adapter: str | None = None,
           suffix: str = "", adapter_files=None) -> "ArtifactResult":
        return cls(artifact, limits, measurement, judge(measurement, limits), dict(settings or {}),
                   tuple(own_settings_failures), adapter, suffix, adapter_files)

    @property
    def name(self) -> str:
        """The artifact's folder in a bundle (a separate adapter's pair: its base artifact's)."""
        return f"{self.artifact.format}-{self.artifact.precision}" + ("" if self.adapter_files else self.suffix)

    @property
    def adapter_path(self) -> str | None:
        """The adapter's runtime files' folder in a bundle, when it is kept separate."""
        return f"adapters/{self.adapter}/{self.artifact.format}" if self.adapter_files else None

    @property
    def label(self) -> str:
        """"gguf Q4_K_M", "gguf Q4_K_M@legal" (merged) or "gguf Q4_K_M+legal" (base + the separate adapter)."""
        return (f"{self.artifact.format} {self.artifact.precision}" +
                (f"+{self.adapter}" if self.adapter_files else self.suffix))

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    @property
    def size_bytes(self) -> int:
        return self.artifact.size_bytes

    def to_json(self) -> dict:
        m, v = self.measurement, self.verdict
        return {
            "format": self.artifact.format, "precision": self.artifact.precision, "adapter": self.adapter,
            "path": self.name, "adapter_path": self.adapter_path, "golden": golden_name(self.suffix),
            "label": self.label,
            **({"adapter_files": list(self.adapter_files.files), "adapter_size_bytes": self.adapter_files.size_bytes}
               if self.adapter_files else {}),
            "files": list(self.artifact.files), "size_bytes": self.size_bytes, "meta": self.artifact.meta,
            "thresholds": self.limits.as_dict(), "full_precision": self.limits.full_precision,
            "parity": {n: (None if m.regime(n) is None else m.regime(n).as_dict()) for n in ("short", "long")},
            "not_applicable": dict(m.not_applicable),
            "greedy": _answer_row(m.greedy, v.greedy),
            "smoke": _smoke_row(m.smoke, v),
            "toolcall": _toolcall_row(m.toolcall, v),
            "device": {"used": m.device[0], "requested": m.device[1]} if m.device else None,
            "failures": list(v.failures), "passed": v.passed,
            "runtime_settings": self.settings, "own_settings_failures": list(self.own_settings_failures),
            "measurement": m.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict, root: Path) -> "ArtifactResult":
        """A result read back from report.json; `root` is the folder that holds its `path` (the bundle)."""
        from ..artifact import Artifact
        art = Artifact(format=d["format"], precision=d["precision"], path=Path(root) / d["path"],
                       files=tuple(d["files"]), meta=d.get("meta") or {})
        t = d["thresholds"]
        limits = Limits(t["top1_min"], t["kl_max"], t["max_abs_max"], bool(d.get("full_precision")))
        pair = Artifact(format=d["format"], precision="adapter", path=Path(root) / d["adapter_path"],
                        files=tuple(d.get("adapter_files") or ())) if d.get("adapter_path") else None
        return cls.of(art, limits, Measurement.from_json(d["measurement"]), settings=d.get("runtime_settings"),
                      own_settings_failures=d.get("own_settings_failures") or (), adapter=d.get("adapter"),
                      suffix=golden_suffix(d.get("golden")), adapter_files=pair)


def _answer_row(a: Answer | None, agreement: TokenAgreement | None) -> dict | None:
    if a is None:
        return None
    return {"tokens": list(a.tokens), "reference": list(a.probe.reference), "prefix_match": a.prefix_match,
            "of": len(a.probe.reference), "forced_tokens": list(a.forced),
            "reference_margins": list(a.probe.margins) if a.probe.margins is not None else None,
            "token_agreement": agreement.as_dict(), "agreement": agreement.rate,
            "prompt_tokens": a.prompt_tokens, "ttft_s": a.ttft_s, "decode_tps": a.decode_tps}


def _toolcall_row(a: Answer | None, v: Verdict) -> dict | None:
    row = _answer_row(a, v.toolcall)
    if row is None:
        return None
    row.update(answer=a.text, call=v.call, reference_call=a.probe.call or None, held=bool(a.probe.call))
    return row


def _smoke_row(a: Answer | None, v: Verdict) -> dict | None:
    row = _answer_row(a, v.smoke)
    if row is None:
        return None
    row.update(answer=a.text, retrieved_has_needle=a.probe.retrieved_has_needle, agreement_min=v.agreement_min)
    if a.probe.fact:
        row["has_fact"] = v.has_fact
    return row
