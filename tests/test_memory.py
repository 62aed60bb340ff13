"""What the build's per-stage peaks and the up-front memory check read: a process tree's resident memory, and
what the machine can still give."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
import numpy as np
import psutil
import pytest

from phiedge import build, errors
from phiedge.cache import StageCache
from phiedge.memory import TreeSampler, available_bytes, tree_resident
from phiedge.stages import Clock, Context, ParallelExecutor, Stage

MB = 2**20


def test_pages_a_forked_child_shares_count_once():
    """A forked child shares every page of its parent: summing RSS counts the buffer twice (the bench's OpenVINO
    export tree summed to 31 GB on a 25 GB machine that way); the tree's sum counts it once."""
    buf = np.ones(512 * MB // 8)                      # 512 MB, touched
    alone = tree_resident(os.getpid())
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                      # the child only holds the shared pages, then waits
        os.close(r)
        os.write(w, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        os.close(w)
        os.read(r, 1)
        child_rss = psutil.Process(pid).memory_info().rss
        assert child_rss > 500 * MB                   # plain RSS sees the whole buffer in the child too
        with TreeSampler(interval=0.05) as s:
            time.sleep(0.3)
        both = tree_resident(os.getpid())
        assert both < alone + 100 * MB, (alone / MB, both / MB)
        assert s.peak_mb < (alone + 100 * MB) / MB
        assert both > 512 * MB                        # and the buffer is still counted
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    del buf


def test_available_memory_is_what_the_machine_can_give():
    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    avail = available_bytes()
    assert 0 < avail <= vm.total + swap.total
    assert avail >= min(vm.available, 1 * 2**30) * 0.5     # not a cgroup figure gone wrong


# ------------------------------------------------------------------------------ the build's memory plan
PHI4_MINI_PARAMS = 3_836_021_760      # the published config's tensors, tied embedding counted once
PHI4_MINI = json.loads((Path(__file__).resolve().parents[1] / "scripts" / "phi4-mini-instruct.config.json").read_text())
ALL_4BIT = {"gguf": ["Q5_K_S"], "onnx": ["int4-b128-k_quant-head8"], "openvino": ["int4-g32"], "mlx": ["4bit"]}


def test_every_stage_has_a_peak_estimate_and_all_fit_in_10_gb_at_full_size():
    """Every stage of the `all` 4-bit build of Phi-4-mini has an estimate from the full-size measurements, each
    within 10 GB (the ONNX int4 export's own pass needed 23.6 GB; phiedge's per-weight pass a fraction of it)."""
    peaks = build.stage_peaks(ALL_4BIT, PHI4_MINI_PARAMS, PHI4_MINI, docs=True)
    assert set(peaks) == {"merge", "retriever", "smoke reference", "prepare openvino",
                          *(f"export {f} {p[0]}" for f, p in ALL_4BIT.items()),
                          *(f"check {f} {p[0]}" for f, p in ALL_4BIT.items())}
    assert max(peaks.values()) <= 10 * 2**30, peaks
    assert peaks["export onnx int4-b128-k_quant-head8"] < 8e9
    # Every runtime's LM head runs on the compared rows only (4200 rows' logits would be 3.4 GB at 200,064); the
    # ONNX check scores on onnxruntime's sliced session, lets it go, then generates on onnxruntime-genai's model:
    # its estimate covers the 7.02 GB measured at full size (both engines at once: 13.3 GB).
    from phiedge import runtimes
    for fmt in ALL_4BIT:
        est = runtimes.get(fmt).check_peak_bytes
        assert est(2**30, 200_064, 4200) == est(2**30, 200_064, 512), fmt       # no every-row logits
    assert 7.02 * 2**30 <= peaks["check onnx int4-b128-k_quant-head8"] < 8 * 2**30
    assert build.memory_shortfalls(peaks, 10 * 2**30) == {}
    tiny = build.stage_peaks(ALL_4BIT, 2_000_000, {**PHI4_MINI, "vocab_size": 2048}, docs=False)
    assert build.memory_shortfalls(tiny, 2 * 2**30) == {}


def test_a_stage_over_max_memory_is_refused_up_front_with_every_other_problem():
    """One line, every problem numbered, before any work: an option that needs --docs, and each stage whose
    estimate is over --max-memory (naming it, its estimate, and what to do)."""
    formats = {"onnx": ["int4-k_quant-mixed8"], "openvino": ["int4-awq"]}
    peaks = build.stage_peaks(formats, PHI4_MINI_PARAMS, PHI4_MINI, docs=False)
    budget = peaks["export onnx int4-k_quant-mixed8"] - 1
    with pytest.raises(errors.UsageError) as e:
        build.preflight(formats, peaks, budget, calibration=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert "(1) openvino int4-awq: data-aware AWQ / scale estimation / GPTQ need calibration text: pass --docs" in msg
    over = [s for s, n in peaks.items() if n > budget]
    assert msg.startswith(f"{1 + len(over)} problems: ") and "export onnx int4-k_quant-mixed8" in over
    need = peaks["export onnx int4-k_quant-mixed8"]
    assert (f"the export onnx int4-k_quant-mixed8 stage of this model needs about {need / 1e9:.1f} GB of memory at its "
            f"peak, more than the build's --max-memory {budget / 1e9:.1f} GB") in msg
    assert "or leave onnx out of --formats" in msg
    with pytest.raises(errors.MemoryShortError, match="the merge stage of this model needs about 9.1 GB"):
        build.preflight({"gguf": ["Q4_K_M"]}, build.stage_peaks({"gguf": ["Q4_K_M"]}, PHI4_MINI_PARAMS,
                                                                PHI4_MINI, docs=False), 4 * 2**30, calibration=True)


def test_max_memory_takes_sizes_and_shares():
    from phiedge.cli import MemorySize
    size = MemorySize()
    assert size.convert("10G", None, None) == 10 * 2**30
    assert size.convert("512mb", None, None) == 512 * 2**20
    assert size.convert("1.5T", None, None) == int(1.5 * 2**40)
    assert 0 < size.convert("50%", None, None) <= available_bytes()
    with pytest.raises(click.BadParameter, match="'lots' is not a memory size: give e.g. 10G, 512M or 60%"):
        size.convert("lots", None, None)


def test_the_parallel_executor_runs_side_by_side_only_what_fits(tmp_path):
    """Real stages (threads sleeping in this process) on the build's executor: the two that fit in the budget
    together overlap, the one that does not fit beside them waits for the running ones, and needs are kept."""
    spans: dict[str, tuple[float, float]] = {}

    def work(name):
        def run(ctx):
            t0 = time.perf_counter()
            time.sleep(0.4)
            spans[name] = (t0, time.perf_counter())
            return name
        return run

    gb = 2**30
    plan = [Stage("a", run=work("a"), peak_bytes=3 * gb), Stage("b", run=work("b"), peak_bytes=3 * gb),
            Stage("big", run=work("big"), peak_bytes=7 * gb), Stage("after", run=work("after"), needs=("a",))]
    ctx = Context(req=None, cache=StageCache(tmp_path))
    out = ParallelExecutor(jobs=3, budget=8 * gb).run(plan, ctx, Clock())
    assert out == {"a": "a", "b": "b", "big": "big", "after": "after"}

    def overlap(x, y):
        return spans[x][0] < spans[y][1] and spans[y][0] < spans[x][1]
    assert overlap("a", "b")
    assert not overlap("big", "a") and not overlap("big", "b")
    assert spans["after"][0] >= spans["a"][1]
    failing = [Stage("ok", run=work("ok")), Stage("bad", run=lambda c: 1 / 0), Stage("later", run=work("later"),
                                                                                       needs=("bad",))]
    with pytest.raises(ZeroDivisionError):
        ParallelExecutor(jobs=2, budget=8 * gb).run(failing, Context(req=None, cache=StageCache(tmp_path)), Clock())
    assert "later" not in spans
