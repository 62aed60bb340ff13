"""An exported artifact: its format, precision, folder and files. Shared by the exporters that make it, the checks
that judge it and the device that validates it, so the device path needs nothing of the exporters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Artifact:
    format: str
    precision: str
    path: Path                      # the artifact folder
    files: tuple[str, ...] = ()     # relative names inside it
    meta: dict = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)
