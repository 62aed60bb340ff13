"""`phiedge matrix` on real Ray: a two-node cluster of this machine (ray.cluster_utils.Cluster, every node on
127.0.0.1) runs 2 tiny adapters x 2 targets that share a GGUF precision; one Ray worker is killed mid-task.
Every test stops the cluster it started."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DEMO, DEMO_DOCS, THREADS, run_cli

# On the session build's worker (it needs no session build): the other worker carries more (docs/development.md).
pytestmark = [pytest.mark.cluster, pytest.mark.gguf, pytest.mark.slow, pytest.mark.session_worker]
ray = pytest.importorskip("ray")
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}      # else Ray binds the machine's address
ADAPTERS = {"lora": "lora", "rs": "rslora"}
TARGETS = {"edge-a": ["Q4_K_M"], "edge-b": ["Q4_K_M", "Q8_0"]}      # both want GGUF Q4_K_M
# A third target whose thresholds no 4-bit artifact meets: its cells fail their gate, alone (their check is the
# same measurement as edge-a's, so they add no stage).
STRICT = "edge-strict"


def _targets(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, precs in TARGETS.items():
        rows = "".join(f'[[artifacts]]\nformat = "gguf"\nprecision = "{p}"\n' for p in precs)
        (folder / f"{name}.toml").write_text(f'name = "{name}"\ndescription = "test"\n{rows}')
        paths.append(str(folder / f"{name}.toml"))
    (folder / f"{STRICT}.toml").write_text(f'name = "{STRICT}"\n[[artifacts]]\nformat = "gguf"\nprecision = "Q4_K_M"\n'
                                           f'[thresholds]\nQ4_K_M = [1.0, 1e-9]\n')
    return paths + [str(folder / f"{STRICT}.toml")]


def write_matrix(tiny: Path, root: Path, out: str = "bundles", cache: str = "cache", name: str = "matrix") -> Path:
    adapters = "".join(f'{n} = "{tiny / "adapters" / a}"\n' for n, a in ADAPTERS.items())
    targets = json.dumps(_targets(root / "targets"))
    path = root / f"{name}.toml"
    path.write_text(f'model = "{tiny / "model"}"\ntargets = {targets}\ndocs = "{DEMO_DOCS}"\nout = "{out}"\n'
                    f'cache_dir = "{cache}"\nthreads = {THREADS}\nsmoke_question = {json.dumps(DEMO["question"])}\n'
                    f'smoke_needle = {json.dumps(DEMO["needle"])}\n[adapters]\n{adapters}')
    return path


def _killer(stop: threading.Event, killed: list) -> None:
    """Kill -9 the first Ray worker seen running a stage task (its process title is ray::_task)."""
    while not stop.is_set() and not killed:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if cmd.startswith(b"ray::_task") and not cmd.startswith(b"ray::IDLE"):
                time.sleep(1.0)          # mid-task: its stage has started writing
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_nodes(tiny, tmp_path_factory):
    """The matrix on a two-node cluster, one worker killed mid-task."""
    from ray.cluster_utils import Cluster
    os.environ.update(LOOPBACK)
    root = tmp_path_factory.mktemp("matrix")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        matrix = write_matrix(tiny, root)
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=_killer, args=(stop, killed), daemon=True)
        killer.start()
        t0 = time.time()
        r = run_cli("matrix", str(matrix), "--ray-address", cluster.address, env=LOOPBACK)
        stop.set()
        yield root, r, killed, time.time() - t0, cluster.address
    finally:
        cluster.shutdown()


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_matrix_builds_every_cell_and_shares_its_stages(two_nodes):
    root, r, killed, _, _ = two_nodes
    summary = json.loads((root / "bundles" / "matrix.json").read_text())
    assert len(summary["nodes"]) == 2
    assert {(c["adapter"], c["target"]) for c in summary["cells"]} == \
        {(a, t) for a in ADAPTERS for t in [*TARGETS, STRICT]}
    good = [c for c in summary["cells"] if c["target"] != STRICT]
    assert all(c["passed"] for c in good), [c["error"] for c in good]
    for c in good:
        manifest = json.loads((root / "bundles" / c["adapter"] / c["target"] / "manifest.json").read_text())
        assert manifest["passed"] and [a["precision"] for a in manifest["artifacts"]] == TARGETS[c["target"]]
    # Shared stages ran once: one merge and one Q4_K_M export per adapter (not per cell), one retriever.
    ran = [t["stage"] for t in summary["tasks"] if t["state"] == "ran"]
    assert ran.count("merge") == 2 and ran.count("retriever") == 1 and ran.count("export gguf Q4_K_M") == 2
    assert ran.count("export gguf Q8_0") == 2 and ran.count("smoke reference") == 2
    shared = next(t for t in summary["tasks"] if t["stage"] == "export gguf Q4_K_M")
    assert len(shared["cells"]) == 3                  # one adapter's edge-a, edge-b and edge-strict
    cache = root / "cache"
    for name, n in (("merge-", 2), ("retriever-", 1), ("smoke-ref-", 2), ("export-gguf-", 4)):
        assert len([d for d in cache.iterdir() if d.name.startswith(name) and d.is_dir()
                    and ".partial" not in d.name]) == n, name
    page = (root / "bundles" / "matrix.html").read_text()
    assert page.count("report.html") == 4 and "rs/edge-b/report.html" in page


def test_a_failing_cell_fails_alone_and_is_listed(two_nodes):
    """The strict target's cells fail their gate; every other cell ships; the command exits 1 naming them."""
    root, r, _, _, _ = two_nodes
    summary = json.loads((root / "bundles" / "matrix.json").read_text())
    assert r.returncode == 1 and not summary["passed"]
    failed = [c for c in summary["cells"] if not c["passed"]]
    assert sorted(c["adapter"] for c in failed) == sorted(ADAPTERS) and {c["target"] for c in failed} == {STRICT}
    for c in failed:
        assert c["error"].startswith("parity failed: gguf Q4_K_M")
        assert not (root / "bundles" / c["adapter"] / STRICT).exists()          # never looks shipped
        assert (root / "bundles" / c["adapter"] / f"{STRICT}.partial" / "report.json").is_file()
        assert f"FAILED {c['adapter']}/{STRICT}: parity failed" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("error: 2 of 6 matrix cells failed: ")


def test_a_worker_killed_mid_task_is_retried_and_the_bundles_match_a_sequential_build(two_nodes, tiny, tmp_path):
    """The matrix's bundles, one worker killed mid-task, hold the same artifact bytes as `phiedge build` of both
    adapters at both precisions, one stage at a time in this process, on a cache of its own (without documents:
    they change no byte of a data-free precision)."""
    root, r, killed, _, _ = two_nodes
    assert killed, "no Ray worker was killed mid-task"
    seq = run_cli("build", "--model", str(tiny / "model"), "--adapter", f"lora={tiny / 'adapters' / 'lora'}",
                  "--adapter", f"rs={tiny / 'adapters' / 'rslora'}", "--formats", "gguf",
                  "--gguf-quant", ",".join(TARGETS["edge-b"]), "--out", str(tmp_path / "seq"),
                  "--cache-dir", str(tmp_path / "cache"), "--threads", THREADS, "--jobs", "1")
    assert seq.returncode == 0, seq.stderr[-3000:]
    bundles = root / "bundles"
    for adapter in ADAPTERS:
        for target, precs in TARGETS.items():
            cell = bundles / adapter / target
            for prec in precs:
                assert _digests(cell / f"gguf-{prec}") == _digests(tmp_path / "seq" / f"gguf-{prec}@{adapter}")


def test_the_same_matrix_in_process_resumes_from_the_cache(two_nodes, tiny):
    """Without --ray-address Ray starts in this process; re-running the matrix finds every stage cached."""
    root, first, _, _, _ = two_nodes
    again = write_matrix(tiny, root, out="bundles-again", name="again")
    r = run_cli("matrix", str(again), env=LOOPBACK)
    assert r.returncode == 1, r.stderr[-3000:]                  # the strict target's cells fail again
    summary = json.loads((root / "bundles-again" / "matrix.json").read_text())
    assert len(summary["nodes"]) == 1 and [c["passed"] for c in summary["cells"]].count(True) == 4
    assert summary["tasks"] and all(t["state"] == "cached" for t in summary["tasks"])
    for c in (c for c in summary["cells"] if c["passed"]):
        rel = Path(c["adapter"]) / c["target"]
        for art in TARGETS[c["target"]]:
            assert _digests(root / "bundles-again" / rel / f"gguf-{art}") == \
                _digests(root / "bundles" / rel / f"gguf-{art}")


def test_the_dry_run_lists_each_stage_once_with_its_state(two_nodes, tiny):
    root, first, _, _, address = two_nodes
    r = run_cli("matrix", str(root / "matrix.toml"), "--dry-run", "--ray-address", address, env=LOOPBACK)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    export = [ln for ln in lines if " export gguf Q4_K_M " in f" {ln} "]
    assert len(export) == 2 and all(ln.startswith("cached") for ln in export)     # one per adapter, not per cell
    assert all(ln.split()[0] in ("cached", "driver") for ln in lines)


@pytest.mark.parametrize("text, message", [
    ('model = "m"\ntargets = ["all"]\nout = "o"\n[adapters]\na = "x"\n[oops]\n', "unknown key 'oops'"),
    ('model = "m"\ntargets = ["all"]\nout = "o"\n', "missing key 'adapters'"),
    ('model = "m"\ntargets = "all"\nout = "o"\n[adapters]\na = "x"\n', "'targets' must be a list of target names"),
])
def test_a_bad_matrix_file_is_one_line(tmp_path, text, message):
    (tmp_path / "m.toml").write_text(text)
    r = run_cli("matrix", str(tmp_path / "m.toml"))
    assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_without_ray_the_matrix_says_how_to_install_it(tiny, tmp_path):
    matrix = write_matrix(tiny, tmp_path)
    code = ("import sys; sys.modules['ray'] = None; from phiedge.cli import main; sys.argv[0] = 'phiedge'; "
            "sys.exit(main())")
    r = subprocess.run([sys.executable, "-c", code, "matrix", str(matrix)], capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip() == ("error: phiedge matrix runs on Ray, which is not installed: pip install "
                                "'phiedge[cluster]' (set PHIEDGE_DEBUG=1 for the traceback)")


def test_a_task_larger_than_every_node_is_refused_with_the_numbers():
    from phiedge.cluster import check_fits
    from phiedge.errors import MemoryShortError
    nodes = [{"node": "a", "memory": 8 * 10**9, "cpus": 2}, {"node": "b", "memory": 16 * 10**9, "cpus": 4}]
    check_fits({"merge": 9 * 10**9}, nodes)
    with pytest.raises(MemoryShortError, match=r"the export onnx int4 stage needs about 20\.0 GB of memory, more "
                                               r"than any node of the cluster offers \(the largest: 16\.0 GB"):
        check_fits({"merge": 9 * 10**9, "export onnx int4": 20 * 10**9}, nodes)
