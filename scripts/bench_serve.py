#!/usr/bin/env python3
"""`make bench-serve`: `phiedge serve` against llama-cpp-python's own OpenAI-compatible server → bench/serve.json.

Both serve the demo bundle's GGUF (make demo builds it) on 127.0.0.1 with the same threads, and both are driven by
the official `openai` client with the same chat messages, streamed, greedy:
1. retrieval off (`rag.k` 0), so both do the same work: phiedge serve and `python -m llama_cpp.server` (from the
   pinned llama-cpp-python's `server` extra), the GGUF's own chat template on both. llama_cpp.server runs with
   `--interrupt_requests False`: by default a new request interrupts the one generating, which cut its answers
   to a token or two at 4 and 8 clients (0 tok/s decode, 7.3 "requests"/s of nothing);
2. retrieval on (k 3), phiedge alone.
At 1, 4 and 8 concurrent clients: time to first token (p50/p95), decode tokens/s (p50, per request: tokens after
the first over the time after the first), requests/s and tokens/s over the run, failed requests, and each
server's resident memory (RSS of its process after the run) beside the model file's size.

Goals (the issue's): at 1 client, TTFT and decode within 5 % of llama_cpp.server's; at 8 clients no failed
request and throughput at least llama_cpp.server's. The numbers are reported met or not.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = Path(os.environ.get("PHIEDGE_DEMO_OUT", ROOT / "demo-out"))
OUT = ROOT / "bench" / "serve.json"
THREADS = int(os.environ.get("PHIEDGE_BENCH_THREADS", "2"))
CLIENTS = (1, 4, 8)
MAX_TOKENS = 64
QUESTIONS = ["What does phiedge check before it ships an artifact?", "How long is Phi-4-mini's context window?",
             "Which runtimes does a bundle target?", "What is a LoRA adapter kept separate?",
             "How does the retriever pick its chunks?", "What does the smoke question prove?",
             "Which device targets are there?", "How are tool calls written?"]


def one(client, model: str, question: str, extra: dict) -> dict:
    t0 = time.perf_counter()
    first, tokens, end = None, 0, None
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, extra_body=extra):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            tokens += 1                                 # pieces; the usage chunk's count replaces it
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    return {"ttft_s": first - t0, "tokens": tokens,
            "decode_tps": (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0, "seconds": end - t0}


def run_level(base: str, model: str, clients: int, extra: dict) -> dict:
    from openai import OpenAI
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
    one(client, model, QUESTIONS[0], extra)                      # warm: the model loaded, caches touched
    jobs = [QUESTIONS[i % len(QUESTIONS)] for i in range(max(8, 2 * clients))]
    results, failed, lock = [], [], threading.Lock()

    def work(q: str) -> None:
        try:
            r = one(client, model, q, extra)
            with lock:
                results.append(r)
        except Exception as e:                                   # noqa: BLE001 -- counted, reported
            with lock:
                failed.append(f"{type(e).__name__}: {e}"[:200])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(work, jobs))
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft_s"] for r in results)
    return {"clients": clients, "requests": len(jobs), "failed": len(failed), "failures": failed[:3],
            "ttft_p50_s": round(statistics.median(ttft), 4) if ttft else None,
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 4) if ttft else None,
            "decode_tps_p50": round(statistics.median(r["decode_tps"] for r in results), 2) if results else None,
            "requests_per_s": round(len(results) / wall, 3), "tokens_per_s": round(sum(r["tokens"] for r in results)
                                                                                      / wall, 2),
            "wall_s": round(wall, 2)}


def measure(name: str, cmd: list[str], port: int, ready: str, model: str, extra: dict) -> dict:
    import psutil

    from phiedge.serve import running
    log = OUT.with_name(f"serve-{name.split()[0].replace('.', '_')}.log")
    with open(log, "w") as out, running(cmd, f"http://127.0.0.1:{port}{ready}", timeout=300, output=out) as proc:
        levels = [run_level(f"http://127.0.0.1:{port}", model, n, extra) for n in CLIENTS]
        rss = psutil.Process(proc.pid).memory_info().rss
    for lv in levels:
        print(f"{name:28} {lv['clients']} clients: TTFT p50 {lv['ttft_p50_s']} s, p95 {lv['ttft_p95_s']} s, "
              f"decode {lv['decode_tps_p50']} tok/s, {lv['requests_per_s']} req/s, {lv['failed']} failed",
              flush=True)
    return {"server": name, "command": cmd, "levels": levels, "rss_bytes": rss}

def main() -> int:
    manifest = json.loads((BUNDLE / "manifest.json").read_text()) if (BUNDLE / "manifest.json").is_file() else None
    if manifest is None:
        raise SystemExit(f"no bundle at {BUNDLE}: run `make demo` first")
    rows = [a for a in manifest["artifacts"] if a["format"] == "gguf" and not a.get("adapter_path")]
    art = next((a for a in rows if a["precision"] == "Q4_K_M"), rows[0])
    gguf = next((BUNDLE / art["path"]).glob("*.gguf"))
    exe = Path(sys.executable).with_name("phiedge")
    from phiedge.serve import free_port
    p1, p2, p3 = free_port(), free_port(), free_port()
    runs = [
        measure("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                                     "127.0.0.1", "--port", str(p1), "--n_threads", str(THREADS), "--n_threads_batch",
                                     str(THREADS), "--n_ctx", "4096", "--interrupt_requests", "False"],
                p1, "/v1/models", str(gguf), {}),
        measure("phiedge serve (rag off)", [str(exe), "serve", str(BUNDLE), "--runtime", art["path"], "--port",
                                            str(p2), "--threads", str(THREADS), "--queue", "64"], p2, "/health",
                art["path"], {"rag": {"k": 0}}),
        measure("phiedge serve (rag k=3)", [str(exe), "serve", str(BUNDLE), "--runtime", art["path"], "--port",
                                            str(p3), "--threads", str(THREADS), "--queue", "64"], p3, "/health",
                art["path"], {"rag": {"k": 3}}),
    ]
    native, ours = runs[0]["levels"], runs[1]["levels"]
    goals = {
        "ttft_within_5pct_at_1": ours[0]["ttft_p50_s"] <= 1.05 * native[0]["ttft_p50_s"],
        "decode_within_5pct_at_1": ours[0]["decode_tps_p50"] >= 0.95 * native[0]["decode_tps_p50"],
        "no_failures_at_8": ours[-1]["failed"] == 0,
        "throughput_at_8_at_least_native": ours[-1]["requests_per_s"] >= native[-1]["requests_per_s"],
    }
    out = {"bundle": str(BUNDLE), "artifact": art["path"], "model_bytes": gguf.stat().st_size, "threads": THREADS,
           "max_tokens": MAX_TOKENS, "machine": {"cpus": os.cpu_count()}, "runs": runs, "goals": goals}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(goals), f"\n→ {OUT}")
    from bench_readme import write as write_readme
    write_readme()                           # bench/README.md: the tables, from the result files
    return 0


if __name__ == "__main__":
    sys.exit(main())
