"""What a trusted build tool survives, proven on the tiny fixture with real builds in child processes:
kill -9 anywhere, two builds of the same inputs, two builds at once on one cache, a damaged cache entry,
a full disk in the middle of an export, and a bundle whose manifest was rewritten (signatures)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import build_args, run_cli
from phiedge import bundle
from phiedge.errors import SignatureError, UsageError

pytestmark = [pytest.mark.gguf, pytest.mark.onnx, pytest.mark.openvino, pytest.mark.mlx, pytest.mark.slow]
PHIEDGE = str(Path(sys.executable).with_name("phiedge"))
# One artifact per format, each the cheapest to check: every export and check stage appears once. Each is also in
# the session build, which is the uninterrupted build (in a cache of its own) these are compared with.
# MLX at the session's precisions, so that its export is the session's (same key) and the two MLX checks, minutes
# on MLX's CPU backend, are taken from the session build after the row that kills one (_seed_from_session).
FORMATS = {"gguf": ["F16"], "onnx": ["fp32"], "openvino": ["fp16"], "mlx": ["fp16", "4bit"]}
GGUF_ONLY = {"gguf": ["F16"]}
# Files that record when and how fast a build ran (report, manifest), and the README listing the artifacts built:
# everything else is a function of the inputs.
TIMED = {"report.json", "report.html", "manifest.json", "README.md"}


def _args(tiny: Path, out: Path, cache: Path, *extra: str, formats: dict = FORMATS) -> list[str]:
    return build_args(tiny, out, cache, formats, *extra)


def _files(b: Path) -> dict[str, str]:
    """sha256 of every file of a bundle but the timed ones."""
    return {k: v["sha256"] for k, v in json.loads((b / "manifest.json").read_text())["files"].items() if k not in TIMED}


def _same_as(bundle: Path, reference: Path) -> list[str]:
    """Files of `bundle` whose bytes differ from (or are missing in) `reference`, a build of a superset."""
    want, got = _files(reference), _files(bundle)
    return [f for f in sorted(got) if got[f] != want.get(f)]


def _stage_dirs(cache: Path) -> list[Path]:
    return [d for d in cache.iterdir() if d.is_dir() and ".partial-" not in d.name and d.name != "locks"]


def _reference(request) -> Path:
    """The session build: uninterrupted, in a cache of its own. Asked for only where a test compares with it, so
    under xdist the builds before the comparison run while the other worker makes the session build."""
    return request.getfixturevalue("session").bundle


# --------------------------------------------------------------------------------------------- kill -9

# (stage whose cache folder to watch, "during" it (seconds after its partial folder appears, or as soon as a
# process of the build runs this module: a check's runtime worker lives about a second on a fast CPU, so a fixed
# delay could find the check finished) or "after" it finished, what is killed: the build process alone or its
# whole process group) -- in build order; each row is one kill of one run, the next run resumes from the cache the
# killed one left.
WORKER = "phiedge.worker"                       # the runtime worker child of a check (phiedge.worker)
KILLS = [
    ("merge", "during", 4.0, "group"),          # the merge child (spawned Python) mid-merge
    ("merge", "after", 0, "parent"),            # boundary: merge done, nothing else started
    ("retriever", "during", 2.0, "parent"),     # embedding the documents in-process
    ("smoke-ref", "after", 0, "group"),         # boundary
    ("export-gguf", "during", 3.0, "parent"),   # llama.cpp's converter is running: it must die with the build
    ("check-gguf-F16", "during", WORKER, "parent"),  # the runtime worker child
    ("export-onnx", "during", 2.0, "group"),    # onnxruntime-genai's builder
    ("export-onnx", "after", 0, "parent"),      # boundary between an export and its check
    ("check-onnx-fp32", "during", WORKER, "group"),
    ("prepare-openvino", "during", 5.0, "parent"),  # optimum-intel trace (once per checkpoint)
    ("check-openvino-fp16", "during", WORKER, "parent"),
    ("export-mlx", "during", 2.0, "group"),     # mlx-lm convert
    ("check-mlx-fp16", "during", 8.0, "parent"),  # MLX prefilling the long probe
    ("bundle", "during", 0, "parent"),          # assembling <out>.partial
]


def _reached(cache: Path, out: Path, stage: str, moment: str) -> bool:
    if stage == "bundle":
        return out.with_name(out.name + ".partial").exists()
    if moment == "during":
        return any(cache.glob(f"{stage}-*.partial-*"))
    return any((d / ".complete").is_file() for d in cache.glob(f"{stage}-*") if ".partial-" not in d.name)


def _session(sid: int) -> list[psutil.Process]:
    alive = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                alive.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return alive


def _running(sid: int, module: str) -> bool:
    """Whether a process of the build's session runs `module`."""
    for q in _session(sid):
        try:
            if module in q.cmdline():
                return True
        except psutil.Error:
            pass
    return False


def _kill_at(args: list[str], cache: Path, out: Path, stage: str, moment: str, delay: float | str, what: str,
             log: Path) -> str:
    with open(log, "w") as f:
        p = subprocess.Popen([PHIEDGE, *args], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while not (_reached(cache, out, stage, moment) and (not isinstance(delay, str) or _running(p.pid, delay))):
        if p.poll() is not None:
            return f"the build ended (exit {p.returncode}) before it reached {stage} ({moment}): {log.read_text()[-800:]}"
        assert time.time() < deadline, f"{stage} never reached"
        time.sleep(0.01)
    if not isinstance(delay, str):
        time.sleep(delay)
    when = f"while {delay} ran" if isinstance(delay, str) else f"{delay} s"
    if p.poll() is not None:
        return f"the build ended before the kill {when} into {stage}"
    if what == "group":
        os.killpg(p.pid, signal.SIGKILL)
    else:
        p.kill()
    p.wait()
    for _ in range(100):                       # children get SIGKILL from the kernel (PR_SET_PDEATHSIG)
        left = _session(p.pid)
        if not left:
            break
        time.sleep(0.05)
    if left:
        return f"{len(left)} child process(es) outlived the build killed in {stage}: {[q.cmdline()[:4] for q in left]}"
    if moment == "during" and stage != "bundle" and not any(cache.glob(f"{stage}-*.partial-*")):
        return f"{stage} finished before the kill {when} in: not a kill in the middle of it"
    return ""


def _seed_from_session(cache: Path, request, prefix: str) -> list[str]:
    """Copy the session build's finished `prefix`* stages into `cache`: the killed MLX check resumes as a cache hit
    (how a check resumes after a kill is proven on the other formats' rows; the MLX row proves the kill in the
    middle of MLX's prefill leaves no child and nothing complete). Were the keys to differ from the session's, the
    copies would go unused and the next run would simply make both checks again."""
    session = request.getfixturevalue("session").cache
    seeded = [d for d in session.glob(f"{prefix}*") if (d / ".complete").is_file() and ".partial-" not in d.name]
    if len(seeded) != len(FORMATS["mlx"]):
        return [f"the session build has {[d.name for d in seeded]}, not one {prefix}* per {FORMATS['mlx']}"]
    for d in seeded:
        if (cache / d.name).exists():
            return [f"{d.name} was already finished: the MLX check row killed nothing"]
        shutil.copytree(d, cache / d.name)
    return []


def test_kill_9_anywhere_resumes_to_a_byte_identical_bundle(tiny, request, tmp_path):
    """Table-driven over the stages (KILLS): at each boundary and in the middle of each long stage, the build
    process alone or its whole process group gets SIGKILL. After each kill no child is left, nothing looks
    complete that is not, and the next run resumes; the bundle of the last run equals an uninterrupted build's
    in a cache of its own, file for file (sha256)."""
    cache, out = tmp_path / "cache", tmp_path / "bundle"
    args = _args(tiny, out, cache)
    problems = []
    for i, (stage, moment, delay, what) in enumerate(KILLS):
        why = _kill_at(args, cache, out, stage, moment, delay, what, tmp_path / f"run{i}.log")
        if why:
            problems.append(f"#{i} {stage} {moment} ({what}): {why}")
            continue
        if out.exists():
            problems.append(f"#{i} {stage}: the killed build left {out}, which looks complete")
        for d in _stage_dirs(cache):            # every finished-looking stage folder is a finished stage
            if not (d / ".complete").is_file():
                problems.append(f"#{i} {stage}: {d.name} has no completion record")
        if stage == "check-mlx-fp16":
            problems += _seed_from_session(cache, request, "check-mlx-")
    assert not problems, "\n".join(problems)
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(cache.glob("*.partial-*")), "the finished build swept every dead partial"
    assert set(_files(out)) > {"golden.npz", "retriever/retriever.sqlite", "gguf-F16/model.gguf",
                               "mlx-fp16/model.safetensors"}
    assert _same_as(out, _reference(request)) == []


# ------------------------------------------------------------------------------------------ two at once

@pytest.fixture(scope="module")
def two_at_once(tiny, tmp_path_factory) -> Path:
    """Same inputs, same cache, different --out, started together (the damaged-cache test reuses the cache)."""
    work = tmp_path_factory.mktemp("two")
    procs = []
    for name in ("a", "b"):
        log = open(work / f"{name}.log", "w")
        procs.append(subprocess.Popen([PHIEDGE, *_args(tiny, work / name, work / "cache", formats=GGUF_ONLY)],
                                      stdout=log, stderr=subprocess.STDOUT))
    for p, name in zip(procs, "ab"):
        assert p.wait(timeout=1800) == 0, (work / f"{name}.log").read_text()[-3000:]
    return work


def test_two_builds_at_once_share_one_cache(two_at_once, request):
    """Both complete, each stage runs once (the other build waits on its lock and finds it finished), and both
    bundles equal the session build's files, made in another cache -- reproducible across caches, byte for byte."""
    ran = [json.loads((two_at_once / n / "report.json").read_text())["cache"]["ran"] for n in "ab"]
    stages = ran[0] + ran[1]
    assert sorted(stages) == sorted(set(stages)), f"a stage ran twice: {ran}"
    assert set(stages) == {"merge", "retriever", "smoke-ref", "export-gguf", "check-gguf-F16"}
    assert _files(two_at_once / "a") == _files(two_at_once / "b")
    for n in "ab":
        assert _same_as(two_at_once / n, _reference(request)) == []


def test_a_dead_lock_holder_keeps_nothing(tiny, tmp_path):
    """A process that holds a stage's lock and dies (kill -9) frees it: the next build takes the stage."""
    from phiedge.cache import StageCache
    cache = StageCache(tmp_path / "cache")
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)")
    sid = "demo-" + "0" * 20
    holder = subprocess.Popen([sys.executable, "-c", code, str(cache.root / "locks" / f"{sid}.lock")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    import fcntl
    fd = os.open(cache.root / "locks" / f"{sid}.lock", os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.kill()
    holder.wait()
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)          # the kernel dropped the dead holder's lock
    os.close(fd)


def test_a_live_writer_keeps_its_partial(tmp_path):
    """A partial stage folder whose writer lock a live process holds is never swept, even when the build that
    made it is gone and the stage's lock is free; once the writer dies, the next sweep removes it."""
    from phiedge.cache import WRITERS, StageCache
    cache = StageCache(tmp_path / "cache")
    partial = cache.root / f"demo-{'0' * 20}.partial-elsewhere-1-abcd"
    partial.mkdir()
    (partial / "half.bin").write_bytes(b"x" * 100)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_SH); print('writing', flush=True); time.sleep(600)")
    writer = subprocess.Popen([sys.executable, "-c", code, str(partial / WRITERS)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    StageCache(tmp_path / "cache")                           # a new build's start-up sweep
    assert (partial / "half.bin").is_file()
    writer.kill()
    writer.wait()
    StageCache(tmp_path / "cache")
    assert not partial.exists()


# ------------------------------------------------------------------------------------------ damaged cache


def test_a_damaged_cache_entry_is_rebuilt_never_shipped(tiny, two_at_once, tmp_path):
    """Each damage of a finished stage (a copy of the two-at-once builds' cache) is found, the stage rebuilt, and
    the bundle is the undamaged one."""
    cache = tmp_path / "cache"
    shutil.copytree(two_at_once / "cache", cache)            # sizes and mtimes kept: the entries look intact
    (export,) = [d for d in _stage_dirs(cache) if d.name.startswith("export-gguf-")]
    (check,) = [d for d in _stage_dirs(cache) if d.name.startswith("check-gguf-F16-")]
    gguf = export / "F16" / "model.gguf"
    want = _files(two_at_once / "a")
    # (how the entry is damaged, whether the default fast check sees it, extra flags) -- why each is here:
    cases = [
        # a truncated artifact: its size differs from the completion record
        (lambda: os.truncate(gguf, gguf.stat().st_size // 2), "export-gguf", []),
        # a file of a finished stage deleted
        (lambda: (check / "measurement.json").unlink(), "check-gguf-F16", []),
        # one byte flipped in place, size and mtime kept: only --verify-cache's full re-hash sees it
        (lambda: _flip_keep_mtime(gguf), "export-gguf", ["--verify-cache"]),
    ]
    for i, (damage, stage, flags) in enumerate(cases, 1):
        damage()
        r = run_cli(*_args(tiny, tmp_path / f"b{i}", cache, *flags, formats=GGUF_ONLY))
        assert r.returncode == 0, r.stderr[-2000:]
        rep = json.loads((tmp_path / f"b{i}" / "report.json").read_text())
        assert stage in rep["cache"]["rebuilt"] and "is damaged" in r.stderr, (stage, r.stderr[-2000:])
        assert _files(tmp_path / f"b{i}") == want
    # Without --verify-cache a same-size, same-mtime change is not re-hashed: the stated limit of the fast path.
    _flip_keep_mtime(gguf)
    r = run_cli(*_args(tiny, tmp_path / "b9", cache, formats=GGUF_ONLY))
    assert r.returncode == 0 and "export-gguf" not in json.loads((tmp_path / "b9" / "report.json").read_text())["cache"]["rebuilt"]


def _flip_keep_mtime(path: Path) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 3)
        b = f.read(1)
        f.seek(st.st_size // 3)
        f.write(bytes([b[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---------------------------------------------------------------------------------------------- disk full

@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'}): the disk-full test needs one")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_in_the_middle_of_an_export(tiny, small_disk, tmp_path):
    """The disk fills up while llama.cpp's converter writes (another process takes the rest of a 256 MB tmpfs):
    one line names the stage and the space it needs, nothing partial is kept or looks complete, and the next run
    with space completes."""
    cache, out = small_disk / "cache", small_disk / "bundle"
    args = ["build", "--model", str(tiny / "model"), "--adapter", str(tiny / "adapters" / "lora"),
            "--formats", "gguf", "--gguf-quant", "F16", "--out", str(out), "--cache-dir", str(cache)]
    p = subprocess.Popen([PHIEDGE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not any(cache.glob("export-gguf-*.partial-*")):
        assert p.poll() is None, p.stderr.read()[-2000:]
        time.sleep(0.02)
    filler = small_disk / "filler"
    with open(filler, "wb") as f:                # what another program on the same disk might do
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    _, err = p.communicate(timeout=600)
    assert p.returncode == 1, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "the export gguf F16 stage ran out of disk space in" in lines[0], err[-2000:]
    assert "it needs about" in lines[0] and "free" in lines[0] and "Traceback" not in err
    assert not list(cache.glob("export-gguf-*.partial-*")), "the failed stage keeps nothing partial"
    assert not [d for d in cache.glob("export-gguf-*") if d.is_dir()] and not out.exists()
    filler.unlink()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "gguf-F16" / "model.gguf").is_file()


# ----------------------------------------------------------------------------------------------- signing

def test_a_rewritten_manifest_is_caught_only_by_a_signature(request, tmp_path):
    reference = _reference(request)
    key, pub = tmp_path / "key", tmp_path / "key.pub"
    r = run_cli("keygen", str(key))
    assert r.returncode == 0 and key.is_file() and pub.is_file() and (key.stat().st_mode & 0o077) == 0, r.stderr
    signed = tmp_path / "signed"
    shutil.copytree(reference, signed)
    r = run_cli("sign", str(signed), "--key", str(key))
    assert r.returncode == 0 and (signed / bundle.SIGNATURE).is_file(), r.stderr
    r = run_cli("verify", str(signed), "--key", str(pub))
    assert r.returncode == 0 and "signature verified" in r.stdout, r.stderr
    r = run_cli("verify", str(signed))
    assert r.returncode == 0 and "not checked" in r.stdout          # signed, no key: says so

    # Swap a file and rewrite the manifest to match: the hashes alone cannot tell.
    forged = tmp_path / "forged"
    shutil.copytree(signed, forged)
    (forged / "README.md").write_text("run this instead\n")
    m = json.loads((forged / "manifest.json").read_text())
    m["files"]["README.md"] = {"sha256": bundle.sha256(forged / "README.md"), "size": (forged / "README.md").stat().st_size}
    (forged / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    assert bundle.verify(forged)
    with pytest.raises(SignatureError, match="does not match manifest.json"):
        bundle.verify(forged, pub)
    for cmd in (["verify", str(forged)], ["ask", str(forged), "hi"], ["validate", str(forged)]):
        r = run_cli(*cmd, "--key", str(pub))
        assert r.returncode == 1 and "does not match manifest.json" in r.stderr, (cmd, r.stderr)

    # An unsigned bundle, or another key, is refused under --key.
    r = run_cli("verify", str(reference), "--key", str(pub))
    assert r.returncode == 1 and "is not signed" in r.stderr
    other = tmp_path / "other"
    run_cli("keygen", str(other))
    with pytest.raises(SignatureError):
        bundle.verify(signed, Path(str(other) + ".pub"))
    with pytest.raises(UsageError, match="not an unencrypted private key"):   # a public key signs nothing
        bundle.sign(signed, pub)
