"""The stage cache: each stage's output lives in a folder named by the hash of its inputs and settings.

What it promises, and how:
- **Atomic stages.** A stage runs into `<name>-<key>.partial-<host>-<pid>-<nonce>/` and is renamed to
  `<name>-<key>/` only when it finished, with a `.complete` marker that records every file's size, mtime and
  sha256. A build killed at any point resumes at the first unfinished stage and never takes a partial output
  for a finished one.
- **One writer per stage.** A build holds `locks/<name>-<key>.lock` (an exclusive `flock`) while it runs the
  stage; a second build that wants the same stage waits and then finds it finished. The kernel drops the lock
  of a process that dies, so a dead holder keeps nothing. On NFS, Linux implements `flock` with the server's
  byte-range locks, so the lock holds across hosts that share the cache; a dead host's lock is freed when the
  server's lease for it expires.
- **No sweep of a live partial.** Everything that writes into a partial folder (the build and each converter,
  exporter or runtime it starts) holds a shared lock on the folder's `.writers` file; a partial is removed only
  by a build holding the stage's lock that can take `.writers` exclusively, that is when no writer lives.
  Children die with the build (PR_SET_PDEATHSIG, phiedge.memory.child_dies_with_parent).
- **Integrity.** A finished stage is handed out only if every recorded file is there with its recorded size and
  mtime (a file whose mtime changed is re-hashed); `verify="full"` re-hashes every file. A damaged entry is
  removed and the stage runs again.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import struct
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

log = logging.getLogger("phiedge")
MARKER = ".complete"
WRITERS = ".writers"
CHUNK = 1 << 22
# Bit masks of the exponent field per safetensors float dtype: a value whose exponent bits are all set is NaN or
# inf (float8 e4m3 has no inf: its NaN is the all-ones pattern below the sign bit).
NONFINITE_MASKS = {"F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000),
                   "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80),
                   "F8_E5M2": (np.uint8, 0x7C), "F8_E4M3": (np.uint8, 0x7F)}
# Writer-lock fds this process holds: passed to the child processes it starts (see writer_fds).
_WRITER_FDS: dict[str, int] = {}


def default_root() -> Path:
    return Path(os.environ.get("PHIEDGE_CACHE", Path.home() / ".cache" / "phiedge")) / "stages"


PACKAGE = Path(__file__).resolve().parent
# Packages whose __init__ is a registry (it imports every format): following it would make each exporter's and
# runtime's stages depend on every other format's code.
REGISTRIES = {"phiedge.exporters", "phiedge.runtimes"}


def _module_file(name: str) -> Path | None:
    rel = name.split(".")[1:]
    if not rel:
        return PACKAGE / "__init__.py"
    return next((p for p in (PACKAGE.joinpath(*rel).with_suffix(".py"), PACKAGE.joinpath(*rel, "__init__.py"))
                 if p.is_file()), None)


def _imports(name: str, path: Path) -> set[str]:
    """phiedge modules `path` imports, anywhere in it (lazy imports inside functions included)."""
    import ast
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("phiedge")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if not mod.startswith("phiedge"):
                continue
            for a in node.names:                 # `from . import probes` names a module, `from .x import f` not
                out.add(f"{mod}.{a.name}" if _module_file(f"{mod}.{a.name}") else mod)
    return out


def module_closure(roots) -> list[Path]:
    """The source files of `roots` (module names) and of every phiedge module they import, transitively."""
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or name in seen or name in REGISTRIES or name == "phiedge":
            continue
        seen[name] = path
        todo += sorted(_imports(name, path))
    return sorted(set(seen.values()))


def code_fingerprint(roots=None) -> str:
    """Hash of the code a stage runs: its root modules and what they import (all of phiedge without roots). A
    stage made by other code is never reused, and editing code a stage does not run (the report, say) does not
    re-run it. What is hashed is what the code does (`code_of`): a comment, a docstring or a reflowed line re-runs
    nothing."""
    files = module_closure(roots) if roots else sorted(PACKAGE.rglob("*.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(PACKAGE)).encode())
        h.update(code_of(f).encode())
    return h.hexdigest()[:16]


def code_of(path: Path) -> str:
    """A module's syntax tree without its docstrings (comments and layout are not in the tree): what it does."""
    import ast
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def scan_safetensors(path: Path) -> tuple[str, str | None]:
    """(sha256 of the file, name of the first tensor holding NaN or inf, or None) in one sequential read: the
    finite check rides along with the hash, which reads every byte anyway."""
    from .tensorfile import safetensors_header
    header = safetensors_header(path)            # validates the layout (truncation, corruption)
    h = hashlib.sha256()
    bad = None
    with open(path, "rb") as f:
        raw = f.read(8)
        (n,) = struct.unpack("<Q", raw)
        h.update(raw)
        h.update(f.read(n))
        pos = 0
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = meta["data_offsets"]
            if start > pos:
                h.update(f.read(start - pos))
            mask = NONFINITE_MASKS.get(meta["dtype"])
            width = np.dtype(mask[0]).itemsize if mask else 1
            left = end - start
            while left:
                block = f.read(min(left, CHUNK - CHUNK % width))
                left -= len(block)
                h.update(block)
                if mask and bad is None:
                    bits = np.frombuffer(block, dtype=mask[0])
                    if np.any((bits & mask[0](mask[1])) == mask[0](mask[1])):
                        bad = name
            pos = end
        h.update(f.read())
    return h.hexdigest(), bad


def writer_fds() -> tuple[int, ...]:
    """Writer-lock fds of the partial stages this process is writing: a child process that inherits them holds
    the lock as long as it lives (flock locks belong to the open file, which the child shares)."""
    return tuple(_WRITER_FDS.values())


def writer_paths() -> tuple[str, ...]:
    """The same locks by path, for children that cannot inherit fds (spawned Python): they take them again."""
    return tuple(_WRITER_FDS)


def hold_writer_locks(paths) -> list[int]:
    """In a child process: share the writer locks of the partials it will write into (kept open until exit)."""
    fds = []
    for p in paths:
        try:
            fd = os.open(p, os.O_RDWR)
        except FileNotFoundError:       # a stage running beside this one's finished meanwhile: its lock is gone
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)
        fds.append(fd)
    return fds


@contextmanager
def _locked(path: Path, mode: int, blocking: bool = True) -> Iterator[int | None]:
    """`flock` on `path` (created if absent); yields the fd, or None when non-blocking and held elsewhere."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)


class StageCache:
    def __init__(self, root: Path | None = None, *, verify: str = "fast"):
        if verify not in ("fast", "full"):
            raise ValueError(f"verify must be 'fast' or 'full', not {verify!r}")
        self.root = Path(root) if root else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "locks").mkdir(exist_ok=True)
        self.verify = verify
        self._digests_path = self.root / "digests.json"
        self._lock = threading.Lock()     # stages side by side (stages.ParallelExecutor) share both memos
        try:
            self._digests = json.loads(self._digests_path.read_text())
        except (OSError, json.JSONDecodeError):
            self._digests = {}
        self._sweep_all()
        self._codes: dict[tuple, str] = {}
        self.hits: list[str] = []
        self.ran: list[str] = []
        self.rebuilt: list[str] = []       # finished stages found damaged and run again
        self.files_hashed = 0              # files sha256-ed by this process (not found in the digest memo)

    # ---------------------------------------------------------------------------------------- input files

    def file_facts(self, path: Path) -> dict:
        """{"sha256", "nonfinite"} of a file, remembered by (path, size, mtime) so unchanged multi-GB weights are
        read once. `nonfinite` names the first safetensors tensor holding NaN or inf (None: all finite)."""
        st = path.stat()
        memo_key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        facts = self._digests.get(memo_key)
        if not isinstance(facts, dict):
            self.files_hashed += 1
            if path.suffix == ".safetensors":
                sha, bad = scan_safetensors(path)
            else:
                sha, bad = sha256_file(path), None
            with self._lock:
                facts = self._digests[memo_key] = {"sha256": sha, "nonfinite": bad}
                self._save_digests()
        return facts

    def digest(self, path: Path) -> str:
        return self.file_facts(path)["sha256"]

    def _save_digests(self) -> None:
        tmp = self._digests_path.with_name(f"digests.json.{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(self._digests))
        tmp.replace(self._digests_path)

    # -------------------------------------------------------------------------------------------- stages

    def stage(self, name: str, parts: dict, fn: Callable[[Path], None], modules=()) -> tuple[Path, bool]:
        """(the finished folder of this stage for these inputs, whether it was already there), running
        `fn(folder)` only if it was not (or was damaged). `modules`: the code the stage runs (its key covers
        them and what they import; without them, all of phiedge)."""
        parts = self._with_code(parts, modules)
        sid = f"{name}-{key_of(parts)}"
        final = self.root / sid
        if self._intact(final):
            self.hits.append(name)
            return final, True
        with _locked(self.root / "locks" / f"{sid}.lock", fcntl.LOCK_EX):
            if self._intact(final):                 # another build finished it while this one waited
                self.hits.append(name)
                return final, True
            if (final / MARKER).exists() or final.exists():
                log.warning("stage %s in %s is damaged (%s): running it again", name, final,
                            self._damage(final) or "incomplete")
                self.rebuilt.append(name)
                shutil.rmtree(final, ignore_errors=True)
            self._sweep(sid)
            work = self.root / f"{sid}.partial-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
            work.mkdir(parents=True)
            try:
                with self._writing(work):
                    fn(work)
                (work / MARKER).write_text(json.dumps({"parts": parts, "files": _inventory(work)},
                                                      sort_keys=True, default=str, indent=1))
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            work.rename(final)
        self.ran.append(name)
        return final, False

    def identity(self, name: str, parts: dict, modules=()) -> str:
        """The folder name `stage(name, parts, ..., modules)` finishes in: the stage's identity across builds."""
        return f"{name}-{key_of(self._with_code(parts, modules))}"

    def intact(self, sid: str) -> bool:
        """Whether the stage folder `sid` is finished and undamaged (read, never built)."""
        return self._intact(self.root / sid)

    def _with_code(self, parts: dict, modules) -> dict:
        roots = tuple(modules)
        with self._lock:    # one thread at a time: CPython 3.11's ast.parse is not thread-safe
            if roots not in self._codes:
                self._codes[roots] = code_fingerprint(roots)
        return {**parts, "code": self._codes[roots]}

    @contextmanager
    def _writing(self, work: Path) -> Iterator[None]:
        """Hold `work/.writers` shared (with every child that inherits it) while the stage writes `work`."""
        lock = work / WRITERS
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.set_inheritable(fd, True)
        _WRITER_FDS[str(lock)] = fd
        try:
            yield
        finally:
            del _WRITER_FDS[str(lock)]
            os.close(fd)
            lock.unlink(missing_ok=True)

    def _intact(self, final: Path) -> bool:
        return (final / MARKER).is_file() and self._damage(final) is None

    def _damage(self, final: Path) -> str | None:
        """What is wrong with a finished stage folder (None: intact)."""
        try:
            files = json.loads((final / MARKER).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return "no readable completion record"
        present = {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file() and p.name != MARKER}
        for rel in sorted(set(files) - present):
            return f"{rel} is missing"
        for rel in sorted(present - set(files)):
            return f"{rel} was added after the stage finished"
        for rel, (size, mtime_ns, sha) in sorted(files.items()):
            st = (final / rel).stat()
            if st.st_size != size:
                return f"{rel} has {st.st_size} bytes, {size} when the stage finished"
            if (self.verify == "full" or st.st_mtime_ns != mtime_ns) and sha256_file(final / rel) != sha:
                return f"{rel} changed after the stage finished (sha256 differs)"
        return None

    def _sweep(self, sid: str) -> None:
        """Remove this stage's partial folders that no live process writes (the caller holds the stage lock)."""
        for p in self.root.glob(f"{sid}.partial-*"):
            lock = p / WRITERS
            if not lock.exists():
                shutil.rmtree(p, ignore_errors=True)
                continue
            with _locked(lock, fcntl.LOCK_EX, blocking=False) as fd:
                if fd is None:
                    log.info("leaving %s: a live process still writes it", p.name)
                    continue
                shutil.rmtree(p, ignore_errors=True)

    def _sweep_all(self) -> None:
        """Partials of any stage left by dead builds: removed where the stage's lock is free right now."""
        for sid in sorted({p.name.split(".partial-")[0] for p in self.root.glob("*.partial-*")}):
            with _locked(self.root / "locks" / f"{sid}.lock", fcntl.LOCK_EX, blocking=False) as fd:
                if fd is not None:
                    self._sweep(sid)


def _inventory(folder: Path) -> dict[str, list]:
    """rel path -> [size, mtime_ns, sha256] of every file of a finished stage."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MARKER:
            st = p.stat()
            out[str(p.relative_to(folder))] = [st.st_size, st.st_mtime_ns, sha256_file(p)]
    return out
