"""The stage cache: each stage's output lives in a folder named by the hash of its inputs and settings.

A stage runs into `<name>-<key>.partial-<pid>/` and is renamed to `<name>-<key>/` with a `.complete`
marker only when it finished, so a build killed at any point (Ctrl-C, kill -9) resumes at the first
unfinished stage and never mistakes a partial output for a finished one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

log = logging.getLogger("phiedge")
MARKER = ".complete"


def default_root() -> Path:
    return Path(os.environ.get("PHIEDGE_CACHE", Path.home() / ".cache" / "phiedge")) / "stages"


def code_fingerprint() -> str:
    """Hash of phiedge's own source: a stage made by other code is never reused."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class StageCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self._digests_path = self.root / "digests.json"
        try:
            self._digests = json.loads(self._digests_path.read_text())
        except (OSError, json.JSONDecodeError):
            self._digests = {}
        self._sweep()
        self.code = code_fingerprint()
        self.hits: list[str] = []
        self.ran: list[str] = []
        self.last_was_hit = False
        self.files_hashed = 0              # files sha256-ed by this process (not found in the digest memo)

    def _sweep(self) -> None:
        """Remove partial stage folders left by processes that no longer run."""
        for p in self.root.glob("*.partial-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(p, ignore_errors=True)

    def digest(self, path: Path) -> str:
        """sha256 of a file, remembered by (path, size, mtime) so unchanged multi-GB weights hash once."""
        st = path.stat()
        memo_key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if memo_key not in self._digests:
            self.files_hashed += 1
            self._digests[memo_key] = sha256_file(path)
            tmp = self._digests_path.with_name(f"digests.json.{os.getpid()}")
            tmp.write_text(json.dumps(self._digests))
            tmp.replace(self._digests_path)
        return self._digests[memo_key]

    def tree_digest(self, folder: Path, files: list[str] | None = None) -> dict[str, str]:
        names = files if files is not None else sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())
        return {n: self.digest(folder / n) for n in names}

    def stage(self, name: str, parts: dict, fn: Callable[[Path], None]) -> Path:
        """The finished folder of this stage for these inputs, running `fn(folder)` only if absent."""
        parts = {**parts, "code": self.code}
        key = key_of(parts)
        final = self.root / f"{name}-{key}"
        if (final / MARKER).exists():
            self.hits.append(name)
            self.last_was_hit = True
            return final
        work = self.root / f"{name}-{key}.partial-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        fn(work)
        (work / MARKER).write_text(json.dumps(parts, sort_keys=True, default=str, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
        self.ran.append(name)
        return final


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
