#!/usr/bin/env python3
"""`make bench` / `make bench-quick`: phiedge's whole pipeline measured beside the tools users would otherwise run.

    python scripts/bench.py [--quick] [--out bench/results.json] [--work DIR] [--skip alternatives,inference]

1. Build: `phiedge build` of every format at the `all` profile's 4-bit row (Q5_K_S, int4 variants, 4bit) with the seed
documents,
   (the precisions of targets/all.toml), in a child process, cold (fresh stage cache): wall time and peak RSS of the
   whole process tree per stage (the
   build records both in report.json) and overall, and artifact sizes. The parity gate is recorded, not required:
   on random full-size weights next-token logits are near-uniform, so 4-bit top-1 agreement means nothing there.
2. The alternatives, standalone on the same merged checkpoint, each in a child process: a PEFT merge
   (`merge_and_unload` + `save_pretrained`, which every standalone route needs first), llama.cpp's
   `convert_hf_to_gguf.py` + quantize to Q4_K_M, onnxruntime-genai's model builder `-p int4`,
   `optimum-cli export openvino --weight-format int4`, `mlx_lm convert -q`.
3. Inference on each 4-bit artifact with the build's threads: time to first token on a 512-token RAG prompt and
   decode tokens/s over 128 tokens, through phiedge's runtime (`generate_ids`) and through the runtime's own loop
   (llama.cpp via llama-cpp-python's `Llama.generate` + llama.cpp's perf counters, onnxruntime-genai's Generator,
   openvino-genai's `LLMPipeline.generate` perf metrics, `mlx_lm.stream_generate` stats); peak RSS of each.
   Each loop runs INFER_REPEATS times, alternating with the other; the best run of each is compared.
4. Memory read bandwidth (numpy reductions, 1 and N threads) and each artifact's bytes read per decoded token
   (its weight files: every weight is read once per token), so tokens/s can be read against the physical limit.
5. The retriever benchmark (scripts/bench_retriever.py).
6. Adapters kept separate, per checked runtime: the base artifact exported for adapters (the exporter's
   BASE_SETTINGS) and each adapter's runtime file (the bench adapter and a second of its shape, every lora_B
   halved), their export times and sizes; then, in one child process, the base loaded with adapter A, a switch to
   B in place (`Runtime.use_adapter`) and back to A (one the process has applied before) against reloading the
   base with B (each followed by the same one-token generation, as a first request after the switch), and
   decode tokens/s with A applied against the merged artifact of the same precision from the build, on the RAG
   prompt of 3.

Formats whose runtime cannot check a 3.8B model on this machine in useful time (`--unchecked`; full-size default:
mlx, whose Linux CPU backend runs GEMMs at about 3 GFLOP/s: tests/test_mlx.py) are exported by phiedge's own exporter
on the
build's merged checkpoint, outside the build, and counted in its wall time and peak; their parity and inference
are listed as not measured here (on Apple silicon `phiedge validate` measures both against the bundle's golden
references).

Goals (pass/fail per line, thresholds fixed by the issue): build peak RSS <= 10 GB; build wall <= 0.8 x the sum of
the standalone tools; each runtime's decode tokens/s >= 0.95 x its native loop. `--quick` runs the same harness
on the tiny fixture: its figures prove nothing, its shape is tested (tests/test_bench.py).

Writes OUT (JSON), OUT with .html (plots and the table) and prints the table.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "demo" / "docs"
FIXTURES = Path(os.environ.get("PHIEDGE_FIXTURES", ROOT / ".fixtures"))
BENCH_HOME = Path(os.environ.get("PHIEDGE_BENCH_DIR", Path.home() / ".cache" / "phiedge" / "bench"))
BIN = Path(sys.executable).parent

PRECISION_FLAGS = {"gguf": "--gguf-quant", "onnx": "--onnx-precision", "openvino": "--ov-weights", "mlx": "--mlx-quant"}
QUESTION = json.loads((ROOT / "demo" / "smoke.json").read_text())["question"]
PROMPT_TOKENS, NEW_TOKENS = 512, 128
MAX_MEMORY = "10G"               # the build runs within this (the issue's goal: a 16 GB laptop builds every format)
# Each runtime's loop runs this many times, alternating with the native one; the best run counts. Measured on
# this 2-core VM at full size: one run each read GGUF 6.9 vs 7.9 tok/s, and a rerun minutes later 6.1-6.9 vs 6.7.
INFER_REPEATS = 3
# Goals: the build's peak (PSS of the tree, run with --max-memory MAX_MEMORY); merge + exports against the
# standalone tools; the whole build, every proof included, against them; decode against the runtime's own loop.
GOAL_BUILD_RSS_GB, GOAL_SAME_WORK_RATIO, GOAL_WALL_RATIO, GOAL_DECODE_RATIO = 10.0, 0.8, 1.5, 0.95
# An adapter kept separate that decodes below this fraction of its merged artifact's speed: ship merged for speed.
SEPARATE_DECODE_OK = 0.9
UNCHECKED_WHY = ("MLX's Linux CPU backend is a correctness path, not a deployment one (about 3 GFLOP/s GEMMs, "
                 "tests/test_mlx.py): measure on Apple silicon")


# ------------------------------------------------------------------------------------------------ helpers

def measured(cmd: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Run `cmd` to completion: wall seconds, peak RSS of its process tree (sampled), exit code."""
    from phiedge.memory import TreeSampler
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        with TreeSampler(proc.pid) as mem:
            _, status, usage = os.wait4(proc.pid, 0)
        rc = os.waitstatus_to_exitcode(status)
    # The sampled tree, or the child's own exact high-water mark (ru_maxrss, KiB) when a short run slipped
    # between samples.
    peak = max(mem.peak_mb, round(usage.ru_maxrss / 1024, 1))
    out = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": peak, "exit": rc, "log": str(log_path)}
    if rc != 0:
        tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        out["error"] = tail[-1][:300] if tail else "no output"
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weight_bytes(path: Path) -> int:
    """The files holding weights (what a decode step reads), not tokenizers or configs."""
    exts = (".gguf", ".onnx.data", ".onnx", ".bin", ".safetensors")
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name.endswith(exts))


def bandwidth(mb: int, threads: int) -> dict:
    """Read bandwidth, GB/s: numpy sums over a buffer much larger than the caches, best of 5, 1 and N threads."""
    a = np.ones(mb * 2**20 // 8)
    a.sum()                                                          # fault the pages in

    def timed(parts: int) -> float:
        chunks = np.array_split(a, parts)
        best = float("inf")
        for _ in range(5):
            ts = [threading.Thread(target=c.sum) for c in chunks]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            best = min(best, time.perf_counter() - t0)
        return round(a.nbytes / best / 1e9, 2)

    return {"buffer_mb": mb, "read_gb_s_1thread": timed(1), f"read_gb_s_{threads}threads": timed(threads),
            "read_gb_s": max(timed(1), timed(threads)), "method": "numpy sum, best of 5"}


# ------------------------------------------------------------------------------------------------ model

def prepare_model(quick: bool, work: Path, fixture: Path | None = None) -> dict:
    if quick:
        d = fixture or FIXTURES / "tiny-phi"
        script = ROOT / "scripts" / "make_tiny_phi.py"
    else:
        d = BENCH_HOME / "phi4-mini-shaped"
        script = ROOT / "scripts" / "make_full_phi.py"
    made = None
    if not (d / ".complete").exists():
        made = measured([sys.executable, str(script), str(d)], work / "logs" / "make-model.log")
        if made["exit"] != 0:
            sys.exit(f"error: making the benchmark model failed: {made['error']} (log {made['log']})")
    model, adapter = d / "model", d / ("adapter" if (d / "adapter").is_dir() else "adapters/lora")
    return {"model": str(model), "adapter": str(adapter), "weight_bytes": weight_bytes(model),
            "made": made, "config": json.loads((model / "config.json").read_text())}


# ------------------------------------------------------------------------------------------------ 1. build

def four_bit_plan(formats: list[str] | None = None) -> dict[str, str]:
    """The `all` profile's 4-bit artifact per format (what a device ships), optionally only some formats."""
    from phiedge import targets
    from phiedge.checks.metrics import is_full_precision
    plan = {a.format: a.precision for a in targets.load("all").artifacts if not is_full_precision(a.precision)}
    return {f: p for f, p in plan.items() if not formats or f in formats}


class BuildFailed(Exception):
    def __init__(self, message: str, build: dict):
        super().__init__(message)
        self.build = build


STAGE_LINE = re.compile(r"✓ (.+?)\s+([\d.]+) s\s+peak\s+([\d.]+) GB")


def stages_in_log(log: Path) -> list[dict]:
    """The stages a build finished before it failed, from its checklist lines."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [{"stage": m[1].strip(), "seconds": float(m[2]), "peak_rss_mb": round(float(m[3]) * 1024, 1)}
            for m in STAGE_LINE.finditer(text)]


def run_build(m: dict, work: Path, threads: int, formats: list[str] | None = None) -> dict:
    plan = four_bit_plan(formats)
    out, cache = work / "bundle", work / "stages"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name("bundle.partial"), ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [str(BIN / "phiedge"), "build", "--model", m["model"], "--adapter", m["adapter"],
           "--formats", ",".join(plan), *[a for f, flag in PRECISION_FLAGS.items() if f in plan
                                            for a in (flag, plan[f])], "--docs", str(DOCS),
           "--out", str(out), "--cache-dir", str(cache), "--threads", str(threads), "--max-memory", MAX_MEMORY]
    res = measured(cmd, work / "logs" / "build.log")
    folder = out if out.is_dir() else out.with_name("bundle.partial")
    rep_file = folder / "report.json"
    if not rep_file.is_file():
        raise BuildFailed(f"the build wrote no report ({res.get('error')}); log {res['log']}",
                          {"command": cmd, "seconds": res["seconds"], "peak_rss_mb": res["peak_rss_mb"],
                           "exit": res["exit"], "error": res.get("error"), "log": res["log"],
                           "stages": stages_in_log(Path(res["log"]))})
    rep = json.loads(rep_file.read_text())
    stages = stages_in_log(Path(res["log"]))           # every checklist line, the bundle's own included
    rest = round(res["seconds"] - sum(s["seconds"] for s in stages), 2)
    stages.append({"stage": "process start", "seconds": rest, "peak_rss_mb": None})
    arts = [{"format": a["format"], "precision": a["precision"], "size_bytes": a["size_bytes"],
             "export_peak_rss_mb": (a.get("meta") or {}).get("export_peak_rss_mb"),
             "passed": a["passed"], "failures": a["failures"], "path": str(folder / a["path"])}
            for a in rep["artifacts"]]
    merged = sorted(glob.glob(str(cache / "merge-*" / "merged")))
    return {"command": cmd, "seconds": res["seconds"], "peak_rss_mb": res["peak_rss_mb"], "exit": res["exit"],
            "gate_passed": rep["passed"], "stages": stages, "artifacts": arts, "bundle": str(folder),
            "merged": merged[0] if merged else None, "log": res["log"]}


EXPORT_ONLY = """
import sys
from pathlib import Path
from phiedge import exporters
fmt, merged, out, precision, threads = sys.argv[1:6]
exp = exporters.get(fmt)
base = sys.argv[6:] == ["--base"]            # a base for adapters kept separate
exp.export(Path(merged), Path(out), [precision], {"threads": int(threads), **(exp.BASE_SETTINGS if base else {})})
"""
ADAPTER_ONLY = """
import sys
from pathlib import Path
from phiedge import exporters
fmt, model, adapter, out = sys.argv[1:5]
exporters.get(fmt).export_adapter(Path(model), Path(adapter), Path(out))
"""


def run_unchecked_exports(build: dict, work: Path, threads: int, plan: dict[str, str]) -> None:
    """phiedge's exporter for each unchecked format, on the build's merged checkpoint, added to the build's
    figures as an export stage (the build's own wall time and peak then cover all four formats)."""
    for fmt, precision in plan.items():
        out = work / f"unchecked-{fmt}"
        shutil.rmtree(out, ignore_errors=True)
        res = measured([sys.executable, "-c", EXPORT_ONLY, fmt, build["merged"], str(out), precision, str(threads)],
                       work / "logs" / f"export-{fmt}.log")
        build["stages"].insert(-1, {"stage": f"export {fmt} (unchecked)", "seconds": res["seconds"],
                                    "peak_rss_mb": res["peak_rss_mb"]})
        build["seconds"] = round(build["seconds"] + res["seconds"], 2)
        build["peak_rss_mb"] = max(build["peak_rss_mb"], res["peak_rss_mb"])
        arts = [d for d in out.iterdir() if d.is_dir()] if out.is_dir() else []
        build["artifacts"].append({"format": fmt, "precision": precision, "checked": False,
                                   "size_bytes": dir_bytes(arts[0]) if arts else 0, "passed": None,
                                   "failures": [res["error"]] if res["exit"] else [],
                                   "path": str(arts[0]) if arts else None})
        print(f"  export {fmt} (unchecked) {res['seconds']:.1f} s, peak {res['peak_rss_mb'] / 1024:.2f} GB, "
              f"exit {res['exit']}", flush=True)


# ------------------------------------------------------------------------------------------------ 2. alternatives

PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
m = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
m = PeftModel.from_pretrained(m, adapter).merge_and_unload()
m.save_pretrained(out, safe_serialization=True)
AutoTokenizer.from_pretrained(base).save_pretrained(out)
"""
LLAMA_QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
p.nthread = int(sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def run_alternatives(m: dict, merged: str, work: Path, threads: int, formats: set[str]) -> list[dict]:
    alt = work / "alt"
    shutil.rmtree(alt, ignore_errors=True)
    alt.mkdir(parents=True)
    logs = work / "logs"
    rows = []

    def record(name: str, tool: str, steps: list[dict], out: Path, note: str | None = None) -> None:
        row = {"name": name, "tool": tool, "seconds": round(sum(s["seconds"] for s in steps), 2),
               "peak_rss_mb": max(s["peak_rss_mb"] for s in steps), "exit": max(s["exit"] for s in steps),
               "steps": steps, "size_bytes": dir_bytes(out) if out.exists() else 0, "note": note}
        rows.append(row)
        print(f"  {name:9} {row['seconds']:8.1f} s  peak {row['peak_rss_mb'] / 1024:5.2f} GB  exit {row['exit']}",
              flush=True)
        shutil.rmtree(out, ignore_errors=True)                  # disk: a full-size run holds ~8 GB per copy

    py = sys.executable
    out = alt / "merged"
    record("merge", "peft merge_and_unload + save_pretrained",
           [measured([py, "-c", PEFT_MERGE, m["model"], m["adapter"], str(out)], logs / "alt-merge.log")], out)

    if "gguf" in formats:
        _alt_gguf(merged, alt, logs, threads, record)
    if "onnx" in formats:
        out = alt / "onnx"
        record("onnx", "python -m onnxruntime_genai.models.builder -p int4 -e cpu",
               [measured([py, "-m", "onnxruntime_genai.models.builder", "-m", merged, "-o", str(out), "-p", "int4",
                          "-e", "cpu", "-c", str(alt / "onnx-cache")], logs / "alt-onnx.log")], out)
        shutil.rmtree(alt / "onnx-cache", ignore_errors=True)
    if "openvino" in formats:
        out = alt / "openvino"
        record("openvino", "optimum-cli export openvino --weight-format int4",
               [measured([str(BIN / "optimum-cli"), "export", "openvino", "--model", merged, "--task",
                          "text-generation-with-past", "--weight-format", "int4", str(out)],
                         logs / "alt-openvino.log")], out)
    if "mlx" in formats:
        out = alt / "mlx"
        record("mlx", "python -m mlx_lm convert -q",
               [measured([py, "-m", "mlx_lm", "convert", "--hf-path", merged, "--mlx-path", str(out), "-q"],
                         logs / "alt-mlx.log")], out)
    return rows


def _alt_gguf(merged: str, alt: Path, logs: Path, threads: int, record) -> None:
    from phiedge.exporters import gguf as gguf_exp
    py = sys.executable
    out = alt / "gguf"
    out.mkdir()
    conv = gguf_exp.converter_dir()
    steps = [measured([py, str(conv / "convert_hf_to_gguf.py"), merged, "--outfile", str(out / "f16.gguf"),
                       "--outtype", "f16"], logs / "alt-gguf-convert.log", env={"PYTHONPATH": str(conv / "gguf-py")})]
    note = None
    failed = (steps[0].get("error") or "") + Path(steps[0]["log"]).read_text(errors="replace")[-3000:]
    if steps[0]["exit"] != 0 and ("pre-tokenizer" in failed or "tokenizer.model" in failed):
        # A synthetic tokenizer's hash is in no converter table (the real Phi-4-mini's is: gpt-4o), and a tokenizer
        # saved by transformers 5 ("TokenizersBackend") sends the stock Phi-3 converter to its SentencePiece path.
        note = ("stock converter refused the tokenizer (pre-tokenizer hash unknown, or tokenizer_class not "
                "GPT2Tokenizer); rerun with phiedge's decisions from tokenizer.json")
        steps = [measured([py, "-m", "phiedge.exporters._llama_convert", str(conv),
                           gguf_exp.decide_vocab(Path(merged)) or "",
                           gguf_exp.decide_pre_tokenizer(Path(merged)) or "", merged, "--outfile",
                           str(out / "f16.gguf"), "--outtype", "f16"], logs / "alt-gguf-convert.log")]
    steps.append(measured([py, "-c", LLAMA_QUANTIZE, str(out / "f16.gguf"), str(out / "q4_k_m.gguf"), str(threads)],
                          logs / "alt-gguf-quantize.log"))
    (out / "f16.gguf").unlink(missing_ok=True)
    record("gguf", "convert_hf_to_gguf.py --outtype f16 + llama_model_quantize Q4_K_M", steps, out, note)


# ------------------------------------------------------------------------------------------------ 3. inference

def rag_prompt_ids(bundle: Path, merged: str, n: int) -> list[int]:
    """A RAG prompt of at most `n` tokens (as close as the chunk text allows): retrieved seed chunks, trimmed."""
    from phiedge import rag
    from phiedge.retriever import Retriever
    with Retriever.open(bundle / "retriever") as r:
        hits = r.search(QUESTION, k=12)

    class Hit:
        def __init__(self, h, text):
            self.source, self.text = h.source, text

    def ids_for(chars: int) -> list[int]:
        left, kept = chars, []
        for h in hits:
            if left <= 0:
                break
            kept.append(Hit(h, h.text[:left]))
            left -= len(h.text)
        return rag.prompt_ids(merged, rag.messages(QUESTION, kept))

    lo, hi = 0, sum(len(h.text) for h in hits)
    while lo < hi:                                                   # the most context that fits in n tokens
        mid = (lo + hi + 1) // 2
        if len(ids_for(mid)) <= n:
            lo = mid
        else:
            hi = mid - 1
    return ids_for(lo)


def infer_child(mode: str, fmt: str, artifact: Path, ids_file: Path, new: int, threads: int) -> dict:
    """Runs in a child process: one generation of `new` tokens after the prompt; prints JSON."""
    ids = json.loads(ids_file.read_text())
    if mode == "ours":
        from phiedge.runtimes import RuntimeSettings, get
        rt = get(fmt).load(artifact, RuntimeSettings(threads=threads))
        gen = rt.generate_ids(ids, new, stop_ids=set())
        return {"ttft_s": gen.ttft_s, "decode_tps": gen.decode_tps, "new_tokens": len(gen.ids)}
    return NATIVE[fmt](artifact, ids, new, threads)


def _native_gguf(artifact: Path, ids: list[int], new: int, threads: int) -> dict:
    import llama_cpp

    from phiedge.runtimes.gguf import _cpu_has_amx
    if _cpu_has_amx():
        # llama.cpp's weight repacking dies with SIGILL in llama_decode on AMX CPUs (the Xeon VM this ran on);
        # phiedge's runtime turns it off there, and so does the native loop here, so both run the same kernels.
        default = llama_cpp.llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p
        llama_cpp.llama_cpp.llama_model_default_params = params
    # "Native" is llama.cpp's own loop at its best here: flash attention off (Llama's default) and on.
    runs = [_llama_generate(llama_cpp, artifact, ids, new, threads, flash) for flash in (False, True)]
    best = max(runs, key=lambda r: r["decode_tps"])
    return {**best, "decode_tps_by_flash_attn": {str(r["flash_attn"]).lower(): r["decode_tps"] for r in runs}}


def _llama_generate(llama_cpp, artifact: Path, ids: list[int], new: int, threads: int, flash: bool) -> dict:
    llm = llama_cpp.Llama(model_path=str(artifact / "model.gguf"), n_ctx=len(ids) + new + 8, n_batch=512,
                          n_threads=threads, n_threads_batch=threads, flash_attn=flash, verbose=False)
    t0 = time.perf_counter()
    first, n = None, 0
    for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n >= new:
            break
    end = time.perf_counter()
    out = {"ttft_s": first - t0, "decode_tps": (n - 1) / (end - first), "new_tokens": n, "loop": "Llama.generate",
           "flash_attn": flash}
    try:
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        out["llama_perf"] = {"prompt_ms": perf.t_p_eval_ms, "prompt_tokens": perf.n_p_eval,
                             "eval_ms": perf.t_eval_ms, "eval_tokens": perf.n_eval,
                             "eval_tps": perf.n_eval / perf.t_eval_ms * 1000 if perf.t_eval_ms else None}
    except Exception as e:                                             # counters are optional evidence
        out["llama_perf"] = {"unavailable": str(e)}
    llm.close()
    return out


def _native_onnx(artifact: Path, ids: list[int], new: int, threads: int) -> dict:
    import onnxruntime_genai as og
    # The runtime's best here: onnxruntime's default intra-op pool is sized by physical cores (one on this
    # 2-vCPU VM, half the speed); phiedge sets the threads asked for, and so does the native loop.
    config = og.Config(str(artifact))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, do_sample=False)
    t0 = time.perf_counter()
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    first, n = None, 0
    while n < new and not gen.is_done():
        gen.generate_next_token()
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_s": first - t0, "decode_tps": (n - 1) / (end - first), "new_tokens": n, "loop": "og.Generator"}


def _native_openvino(artifact: Path, ids: list[int], new: int, threads: int) -> dict:
    import openvino as ov
    import openvino_genai as ovg
    pipe = ovg.LLMPipeline(str(artifact), "CPU", INFERENCE_NUM_THREADS=threads)
    cfg = ovg.GenerationConfig()
    cfg.max_new_tokens, cfg.min_new_tokens, cfg.ignore_eos, cfg.do_sample = new, new, True, False
    arr = np.asarray([ids], dtype=np.int64)
    res = pipe.generate(ovg.TokenizedInputs(ov.Tensor(arr), ov.Tensor(np.ones_like(arr))), cfg)
    pm = res.perf_metrics
    return {"ttft_s": pm.get_ttft().mean / 1000, "decode_tps": pm.get_throughput().mean,
            "new_tokens": pm.get_num_generated_tokens(), "loop": "LLMPipeline.generate perf_metrics"}


def _native_mlx(artifact: Path, ids: list[int], new: int, threads: int) -> dict:
    import mlx.core as mx
    import mlx_lm
    mx.set_default_device(mx.cpu)
    model, tok = mlx_lm.load(str(artifact))
    last = None
    for last in mlx_lm.stream_generate(model, tok, prompt=ids, max_tokens=new):
        pass
    return {"ttft_s": last.prompt_tokens / last.prompt_tps, "decode_tps": last.generation_tps,
            "new_tokens": last.generation_tokens, "loop": "mlx_lm.stream_generate stats"}


NATIVE = {"gguf": _native_gguf, "onnx": _native_onnx, "openvino": _native_openvino, "mlx": _native_mlx}


def prompt_ids_file(build: dict, work: Path) -> Path:
    """The RAG prompt every inference measurement decodes after (PROMPT_TOKENS at most), written once."""
    ids_file = work / "prompt_ids.json"
    if not ids_file.is_file():
        ids_file.write_text(json.dumps(rag_prompt_ids(Path(build["bundle"]), build["merged"], PROMPT_TOKENS)))
    return ids_file


def run_inference(build: dict, work: Path, threads: int, bw: float) -> list[dict]:
    ids_file = prompt_ids_file(build, work)
    ids = json.loads(ids_file.read_text())
    rows = []
    for a in build["artifacts"]:
        if a.get("checked") is False:
            continue
        row = {"format": a["format"], "precision": a["precision"], "prompt_tokens": len(ids),
               "weight_bytes": weight_bytes(Path(a["path"]))}
        row["roofline_tps"] = round(bw * 1e9 / row["weight_bytes"], 1) if row["weight_bytes"] else None
        runs: dict[str, list[dict]] = {"ours": [], "native": []}
        for rep in range(INFER_REPEATS):             # interleaved, so a slow spell of the machine hits both
            for mode in ("ours", "native"):
                res_file = work / f"infer-{a['format']}-{mode}-{rep}.json"
                cmd = [sys.executable, __file__, "--infer-child", mode, a["format"], a["path"], str(ids_file),
                       str(NEW_TOKENS), str(threads), str(res_file)]
                run = measured(cmd, work / "logs" / f"infer-{a['format']}-{mode}-{rep}.log")
                runs[mode].append({**(json.loads(res_file.read_text()) if res_file.is_file() else {}),
                                   "peak_rss_mb": run["peak_rss_mb"], "exit": run["exit"], "error": run.get("error")})
        for mode, done in runs.items():               # the best run: throughput on a shared machine only errs low
            row[mode] = {**max(done, key=lambda r: r.get("decode_tps") or 0),
                         "decode_tps_runs": [r.get("decode_tps") for r in done]}
        o, n = row["ours"].get("decode_tps"), row["native"].get("decode_tps")
        row["decode_ratio"] = round(o / n, 3) if o and n else None
        rows.append(row)
        print(f"  {a['format']:9} ours {o or 0:7.1f} tok/s  native {n or 0:7.1f} tok/s  "
              f"ratio {row['decode_ratio']}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ 6. adapters

def second_adapter(adapter: Path, out: Path) -> Path:
    """An adapter of the same shape with every lora_B halved: what a switch costs depends on shapes, not values."""
    from safetensors.torch import load_file, save_file  # torch's: the adapter may hold bf16
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(adapter, out)
    f = out / "adapter_model.safetensors"
    save_file({k: v * 0.5 if "lora_B" in k else v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    return out


def adapter_child(spec: dict) -> dict:
    """Runs in a child process: load with adapter A, decode, switch to B in place, reload with B, decode merged."""
    from phiedge.runtimes import RuntimeSettings, get
    cls, ids, new, threads = get(spec["format"]), spec["ids"], spec["new"], spec["threads"]
    a, b = spec["adapters"]

    def settings(adapter: str | None = None) -> RuntimeSettings:
        return RuntimeSettings(threads=threads, extra={"adapter": adapter} if adapter else {})

    def first_request(rt) -> None:                  # what a request right after a switch or a load pays
        rt.generate_ids(ids[:16], 1, stop_ids=set())

    t = time.perf_counter()
    rt = cls.load(Path(spec["base"]), settings(a))
    first_request(rt)
    load_s = time.perf_counter() - t
    with_a = rt.generate_ids(ids, new, stop_ids=set())
    t = time.perf_counter()
    rt.use_adapter(Path(b))
    first_request(rt)
    switch_s = time.perf_counter() - t
    t = time.perf_counter()
    rt.use_adapter(Path(a))                         # back to one this process has applied before
    first_request(rt)
    switch_back_s = time.perf_counter() - t
    rt.close()
    t = time.perf_counter()
    rt = cls.load(Path(spec["base"]), settings(b))
    first_request(rt)
    reload_s = time.perf_counter() - t
    rt.close()
    rt = cls.load(Path(spec["merged"]), settings())
    merged = rt.generate_ids(ids, new, stop_ids=set())
    rt.close()
    return {"load_with_adapter_s": load_s, "switch_s": switch_s, "switch_back_s": switch_back_s, "reload_s": reload_s,
            "adapter_decode_tps": with_a.decode_tps, "merged_decode_tps": merged.decode_tps,
            "new_tokens": len(with_a.ids)}


def run_adapters(m: dict, build: dict, work: Path, threads: int, ids_file: Path) -> list[dict]:
    root = work / "adapters"
    shutil.rmtree(root, ignore_errors=True)
    logs = work / "logs"
    adapters = {"a": Path(m["adapter"]), "b": second_adapter(Path(m["adapter"]), root / "adapter-b")}
    rows = []
    for art in build["artifacts"]:
        if art.get("checked") is False:
            continue
        fmt, precision = art["format"], art["precision"]
        row: dict = {"format": fmt, "precision": precision, "merged_bytes": art["size_bytes"]}
        out = root / f"base-{fmt}"
        res = measured([sys.executable, "-c", EXPORT_ONLY, fmt, m["model"], str(out), precision, str(threads),
                        "--base"], logs / f"adapters-base-{fmt}.log")
        base = [d for d in out.iterdir() if d.is_dir()] if out.is_dir() else []
        row["base_export"] = {"seconds": res["seconds"], "peak_rss_mb": res["peak_rss_mb"], "exit": res["exit"],
                              "error": res.get("error")}
        row["base_bytes"] = dir_bytes(base[0]) if base else 0
        files = {}
        for name, src in adapters.items():
            res = measured([sys.executable, "-c", ADAPTER_ONLY, fmt, m["model"], str(src),
                            str(root / f"{name}-{fmt}")], logs / f"adapters-{name}-{fmt}.log")
            files[name] = root / f"{name}-{fmt}"
            row[f"adapter_{name}_export"] = {"seconds": res["seconds"], "peak_rss_mb": res["peak_rss_mb"],
                                             "exit": res["exit"], "error": res.get("error")}
        row["adapter_bytes"] = dir_bytes(files["a"]) if files["a"].is_dir() else 0
        if not base or any(row[f"adapter_{n}_export"]["exit"] for n in adapters):
            row["error"] = "an export failed: see its log"
            rows.append(row)
            continue
        spec_file, res_file = root / f"spec-{fmt}.json", root / f"result-{fmt}.json"
        spec_file.write_text(json.dumps({"format": fmt, "base": str(base[0]), "merged": art["path"],
                                         "adapters": [str(files["a"]), str(files["b"])], "threads": threads,
                                         "ids": json.loads(ids_file.read_text()), "new": NEW_TOKENS}))
        run = measured([sys.executable, __file__, "--adapter-child", str(spec_file), str(res_file)],
                       logs / f"adapters-run-{fmt}.log")
        row.update(json.loads(res_file.read_text()) if res_file.is_file() else {"error": run.get("error")})
        row["run"] = {"peak_rss_mb": run["peak_rss_mb"], "exit": run["exit"]}
        if row.get("merged_decode_tps"):
            row["decode_ratio"] = round(row["adapter_decode_tps"] / row["merged_decode_tps"], 3)
            row["ship_merged_for_speed"] = row["decode_ratio"] < SEPARATE_DECODE_OK
        rows.append(row)
        print(f"  {fmt:9} switch {row.get('switch_s', 0):6.2f} s  reload {row.get('reload_s', 0):6.2f} s  "
              f"decode with adapter {row.get('adapter_decode_tps', 0):7.1f} tok/s  merged "
              f"{row.get('merged_decode_tps', 0):7.1f}  adapter {row['adapter_bytes'] / 1e6:.1f} MB  base "
              f"{row['base_bytes'] / 1e6:.1f} MB", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ goals, output

def goals(build: dict, alternatives: list[dict], inference: list[dict], unchecked_why: str = "") -> list[dict]:
    without = f" (without {', '.join(build['not_built'])}: not built)" if build.get("not_built") else ""
    out = [{"goal": f"build peak (PSS) <= {GOAL_BUILD_RSS_GB:g} GB with --max-memory {MAX_MEMORY}{without}",
            "measured": round(build["peak_rss_mb"] / 1024, 2),
            "limit": GOAL_BUILD_RSS_GB, "passed": build["peak_rss_mb"] / 1024 <= GOAL_BUILD_RSS_GB}]
    cmp = comparison(build, alternatives)
    if cmp:
        for goal, ratio, limit in (
                ("merge + exports", cmp["merge_and_exports_ratio"], GOAL_SAME_WORK_RATIO),
                ("whole build, every proof included,", cmp["build_ratio"], GOAL_WALL_RATIO)):
            out.append({"goal": f"{goal} wall <= {limit:g} x the standalone tools (incl. their merge)",
                        "measured": ratio, "limit": limit, "passed": bool(ratio is not None and ratio <= limit)})
    for r in inference:
        out.append({"goal": f"{r['format']} decode tok/s >= {GOAL_DECODE_RATIO:g} x native",
                    "measured": r["decode_ratio"], "limit": GOAL_DECODE_RATIO,
                    "passed": bool(r["decode_ratio"] is not None and r["decode_ratio"] >= GOAL_DECODE_RATIO)})
    for f, why in build.get("not_built", {}).items():
        out.append({"goal": f"{f} decode tok/s >= {GOAL_DECODE_RATIO:g} x native", "measured": None,
                    "limit": GOAL_DECODE_RATIO, "passed": None, "not_measured": f"not built: {why}"})
    for a in build["artifacts"]:
        if a.get("checked") is False and inference:
            out.append({"goal": f"{a['format']} decode tok/s >= {GOAL_DECODE_RATIO:g} x native",
                        "measured": None, "limit": GOAL_DECODE_RATIO, "passed": None,
                        "not_measured": unchecked_why})
    return out


def comparison(build: dict, alternatives: list[dict]) -> dict | None:
    """Whole build and its merge + export stages (the work the standalone route also does) against that route."""
    if not alternatives:
        return None
    standalone = sum(a["seconds"] for a in alternatives)
    same_work = sum(s["seconds"] for s in build["stages"] if s["stage"] == "merge" or s["stage"].startswith("export "))
    return {"standalone_s": round(standalone, 2), "build_s": build["seconds"],
            "build_ratio": round(build["seconds"] / standalone, 3),
            "merge_and_exports_s": round(same_work, 2), "merge_and_exports_ratio": round(same_work / standalone, 3),
            "checks_s": round(sum(s["seconds"] for s in build["stages"] if s["stage"].startswith("check ")), 2)}


def summary(res: dict) -> str:
    lines = [f"phiedge bench ({res['mode']}) — {res['machine']['cpu']}, {res['machine']['cores']} cores, "
             f"read bandwidth {res['bandwidth']['read_gb_s']} GB/s", "",
             f"{'build stage':34} {'wall s':>9} {'peak GB':>8}"]
    for s in res["build"]["stages"]:
        pk = f"{s['peak_rss_mb'] / 1024:8.2f}" if s["peak_rss_mb"] else f"{'-':>8}"
        lines.append(f"{s['stage']:34} {s['seconds']:9.1f} {pk}")
    lines.append(f"{'whole build':34} {res['build']['seconds']:9.1f} {res['build']['peak_rss_mb'] / 1024:8.2f}")
    lines += [f"not built: {f}: {why}" for f, why in res["build"].get("not_built", {}).items()]
    if res["alternatives"]:
        lines += ["", f"{'standalone tool':34} {'wall s':>9} {'peak GB':>8} {'size MB':>9}"]
        for a in res["alternatives"]:
            lines.append(f"{a['name']:34} {a['seconds']:9.1f} {a['peak_rss_mb'] / 1024:8.2f} "
                         f"{a['size_bytes'] / 1e6:9.1f}{'' if a['exit'] == 0 else '  FAILED: ' + str(a['steps'][-1].get('error'))}")
        c = res["comparison"]
        lines.append(f"{'sum':34} {c['standalone_s']:9.1f}")
        lines.append(f"phiedge / standalone: whole build {c['build_ratio']:.2f}x; its merge + exports "
                     f"{c['merge_and_exports_ratio']:.2f}x; parity + smoke checks {c['checks_s']:.1f} s (the standalone "
                     f"route checks nothing)")
    if res["inference"]:
        lines += ["", f"{'runtime (4-bit)':18} {'TTFT s':>7} {'tok/s':>7} {'native':>7} {'ratio':>6} "
                      f"{'roofline':>8} {'peak GB':>8}"]
        for r in res["inference"]:
            o, n = r["ours"], r["native"]
            lines.append(f"{r['format'] + ' ' + r['precision']:18} {o.get('ttft_s') or 0:7.2f} "
                         f"{o.get('decode_tps') or 0:7.1f} {n.get('decode_tps') or 0:7.1f} "
                         f"{r['decode_ratio'] or 0:6.2f} {r['roofline_tps'] or 0:8.1f} {o['peak_rss_mb'] / 1024:8.2f}")
    if res.get("adapters"):
        lines += ["", f"{'adapters (4-bit base)':22} {'switch s':>8} {'back s':>7} {'reload s':>8} {'tok/s A':>8} "
                      f"{'merged':>8} "
                      f"{'ratio':>6} {'adapter MB':>10} {'base MB':>8}  ship"]
        for r in res["adapters"]:
            if "decode_ratio" not in r:
                lines.append(f"{r['format'] + ' ' + r['precision']:22} FAILED: {r.get('error')}")
                continue
            lines.append(f"{r['format'] + ' ' + r['precision']:22} {r['switch_s']:8.2f} {r['switch_back_s']:7.2f} "
                         f"{r['reload_s']:8.2f} "
                         f"{r['adapter_decode_tps']:8.1f} {r['merged_decode_tps']:8.1f} {r['decode_ratio']:6.2f} "
                         f"{r['adapter_bytes'] / 1e6:10.1f} {r['base_bytes'] / 1e6:8.1f}  "
                         f"{'merged (speed)' if r['ship_merged_for_speed'] else 'separate'}")
    verdict = {True: "PASS", False: "FAIL", None: "n/a "}
    lines += ["", "goals:"] + [f"  {verdict[g['passed']]}  {g['goal']}: "
                               f"{g['measured'] if g['passed'] is not None else 'not measured: ' + g['not_measured']}"
                               for g in res["goals"]]
    return "\n".join(lines)


def write_html(res: dict, path: Path) -> None:
    import html

    from phiedge.report import bar_chart
    b = res["build"]
    figs = [bar_chart([(s["stage"], s["seconds"]) for s in b["stages"]], "s", "phiedge build: wall time per stage"),
            bar_chart([(s["stage"], (s["peak_rss_mb"] or 0) / 1024) for s in b["stages"]], "GB",
                      "phiedge build: peak RSS of the process tree per stage")]
    if res["alternatives"]:
        figs.append(bar_chart([("phiedge build (all four)", b["seconds"])] +
                              [(a["name"], a["seconds"]) for a in res["alternatives"]], "s",
                              "wall time: phiedge vs standalone tools"))
        figs.append(bar_chart([("phiedge build", b["peak_rss_mb"] / 1024)] +
                              [(a["name"], a["peak_rss_mb"] / 1024) for a in res["alternatives"]], "GB",
                              "peak RSS: phiedge vs standalone tools"))
    if res["inference"]:
        bars = []
        for r in res["inference"]:
            bars += [(f"{r['format']} phiedge", r["ours"].get("decode_tps") or 0),
                     (f"{r['format']} native", r["native"].get("decode_tps") or 0),
                     (f"{r['format']} roofline", r["roofline_tps"] or 0)]
        figs.append(bar_chart(bars, "tok/s", "decode tokens/s (2 threads) vs memory-bandwidth roofline"))
    timed = [r for r in res.get("adapters") or [] if "switch_s" in r]
    if timed:
        figs.append(bar_chart([b for r in timed for b in ((f"{r['format']} switch in place", r["switch_s"]),
                                                           (f"{r['format']} reload the base", r["reload_s"]))],
                              "s", "adapters kept separate: switch in place vs reload the base with the other"))
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>phiedge bench</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}} figure{{margin:1.5em 0}}</style></head><body>
<h1>phiedge bench ({html.escape(res['mode'])})</h1>{''.join(figs)}<pre>{html.escape(summary(res))}</pre></body></html>""")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny fixture: tests the harness, proves nothing")
    ap.add_argument("--fixture", type=Path, default=None,
                    help="with --quick: a tiny fixture folder (model/, adapters/lora/; default .fixtures/tiny-phi, "
                         "made by scripts/make_tiny_phi.py when missing)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="scratch (default: a folder under the bench home)")
    ap.add_argument("--formats", default="", help="comma list: only these formats (default: all four)")
    ap.add_argument("--skip", default="", help="comma list of: alternatives, inference, adapters, retriever")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--unchecked", default=None,
                    help="comma list of formats exported outside the build, unchecked (default: mlx at full size, "
                         "none with --quick)")
    ap.add_argument("--infer-child", nargs=7, metavar="X", help=argparse.SUPPRESS)
    ap.add_argument("--adapter-child", nargs=2, metavar="X", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.infer_child:
        mode, fmt, art, ids_file, new, threads, out = args.infer_child
        res = infer_child(mode, fmt, Path(art), Path(ids_file), int(new), int(threads))
        Path(out).write_text(json.dumps(res))
        return 0
    if args.adapter_child:
        spec, out = args.adapter_child
        Path(out).write_text(json.dumps(adapter_child(json.loads(Path(spec).read_text()))))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mode = "quick" if args.quick else "full"
    out = args.out or ROOT / "bench" / ("results-quick.json" if args.quick else "results.json")
    work = args.work or BENCH_HOME / f"work-{mode}"
    work.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    t0 = time.perf_counter()

    print(f"[bench {mode}] model", flush=True)
    m = prepare_model(args.quick, work, args.fixture)
    print(f"[bench {mode}] memory bandwidth", flush=True)
    bw = bandwidth(256 if args.quick else 2048, args.threads)
    print(f"[bench {mode}] phiedge build (cold cache)", flush=True)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unchecked = {f.strip() for f in (args.unchecked if args.unchecked is not None else
                                     "" if args.quick else "mlx").split(",") if f.strip()}
    plan = four_bit_plan(formats)
    not_built = too_big_here(m, plan)
    for f, why in not_built.items():
        print(f"  {f}: not built: {why}", flush=True)
    plan = {f: p for f, p in plan.items() if f not in not_built}
    try:
        build = run_build(m, work, args.threads, [f for f in plan if f not in unchecked])
    except BuildFailed as e:
        build = {**e.build, "not_built": not_built}
        write_results(out, {**results_head(mode, args.threads), "bandwidth": bw, "build": build, "failed": str(e),
                            "bench_seconds": round(time.perf_counter() - t0, 1)})
        print(f"error: {e}; the stages it finished are in {out}", file=sys.stderr)
        return 1
    if unchecked & set(plan) and build["merged"]:
        run_unchecked_exports(build, work, args.threads, {f: p for f, p in plan.items() if f in unchecked})
    build["unchecked"] = sorted(unchecked & set(plan))
    (work / "prompt_ids.json").unlink(missing_ok=True)          # an earlier run's model may have made it
    build["not_built"] = not_built
    print(f"  build {build['seconds']:.1f} s, peak {build['peak_rss_mb'] / 1024:.2f} GB, gate "
          f"{'passed' if build['gate_passed'] else 'failed'}", flush=True)
    alternatives = []
    if "alternatives" not in skip and build["merged"]:
        print(f"[bench {mode}] standalone tools", flush=True)
        alternatives = run_alternatives(m, build["merged"], work, args.threads,
                                        {a["format"] for a in build["artifacts"]})
    inference = []
    if "inference" not in skip:
        print(f"[bench {mode}] inference", flush=True)
        inference = run_inference(build, work, args.threads, bw["read_gb_s"])
    adapters = []
    if "adapters" not in skip and build["merged"]:
        print(f"[bench {mode}] adapters kept separate", flush=True)
        adapters = run_adapters(m, build, work, args.threads, prompt_ids_file(build, work))
    retriever = None
    if "retriever" not in skip:
        print(f"[bench {mode}] retriever", flush=True)
        rfile = work / "retriever.json"
        r = measured([sys.executable, str(ROOT / "scripts" / "bench_retriever.py"), str(rfile)] +
                     (["--quick"] if args.quick else []), work / "logs" / "retriever.log")
        retriever = json.loads(rfile.read_text()) if r["exit"] == 0 else {"error": r.get("error")}
    res = {**results_head(mode, args.threads),
           "model": {k: m[k] for k in ("model", "adapter", "weight_bytes", "made")} |
                    {"params_config": {k: m["config"].get(k) for k in ("num_hidden_layers", "hidden_size",
                                                                        "vocab_size", "intermediate_size")}},
           "bandwidth": bw, "build": build, "alternatives": alternatives, "inference": inference,
           "adapters": adapters,
           "retriever": retriever, "comparison": comparison(build, alternatives),
           "goals": goals(build, alternatives, inference, UNCHECKED_WHY),
           "bench_seconds": round(time.perf_counter() - t0, 1)}
    write_results(out, res)
    write_html(res, out.with_suffix(".html"))
    if not args.quick and out == ROOT / "bench" / "results.json":
        from bench_readme import write as write_readme
        write_readme()                       # bench/README.md: the tables, from the result files
    print("\n" + summary(res) + f"\n\nresults: {out} (plots: {out.with_suffix('.html')})")
    return 0


def write_results(out: Path, res: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.rename(out)


def results_head(mode: str, threads: int) -> dict:
    """What every results file starts with, finished or not: schema, mode, time, and the machine."""
    return {"schema": 1, "mode": mode, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpu": platform.processor() or _cpu_name(), "cores": os.cpu_count(),
                        "platform": platform.platform(), "threads": threads,
                        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1)}}


def too_big_here(m: dict, plan: dict[str, str]) -> dict[str, str]:
    """Formats with a stage phiedge refuses within the bench's --max-memory (the build's own up-front check)."""
    from phiedge import build, cli, source
    model = source.resolve(m["model"], kind="model")
    peaks = build.stage_peaks({f: [p] for f, p in plan.items()}, source.param_count(model), m["config"], docs=True)
    short = build.memory_shortfalls(peaks, cli.MemorySize().convert(MAX_MEMORY, None, None))
    return {build.stage_format(stage): why for stage, why in short.items() if build.stage_format(stage)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
