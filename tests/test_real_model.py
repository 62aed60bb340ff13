"""A real instruct model through the whole backbone: SmolLM2-135M-Instruct (Llama architecture, no LongRoPE)
+ a LoRA trained on the demo documents, exported to GGUF, gated, and asked a question from the documents."""
from __future__ import annotations

import json

import pytest

from conftest import DEMO, DEMO_DOCS
from phiedge import rag
from phiedge.build import BuildRequest, build
from phiedge.errors import UsageError
from phiedge.retriever import Retriever, build_index
from phiedge.runtimes import get

pytestmark = [pytest.mark.gguf, pytest.mark.session_worker]   # evens out the two xdist workers

QUESTION, NEEDLE, FACT = DEMO["question"], DEMO["needle"], DEMO["answer"]


@pytest.mark.slow
def test_smollm2_lora_to_gguf_answers_from_context(smollm2, tmp_path):
    # F16: the demo LoRA states the fact at a near-tie for a 135M model, and on some CPUs the fixture trains to
    # one whose Q8_0 answer takes the other branch ("a licensed license" against PyTorch's "a license that is
    # published under the MIT license"); the quantized formats are the session build's and the demo's.
    cache = tmp_path / "cache"
    rep = build(BuildRequest(model=str(smollm2 / "model"), adapters={"adapter": str(smollm2 / "adapter")},
                             formats={"gguf": ["F16"]}, out=tmp_path / "dist", docs=DEMO_DOCS, cache_dir=cache,
                             smoke_question=QUESTION, smoke_needle=NEEDLE, smoke_answer=FACT))
    assert rep["passed"]
    row = rep["artifacts"][0]
    assert row["parity"]["long"] is None, "no LongRoPE: only the short regime applies"
    assert row["parity"]["short"]["kl"] < 0.02 and row["meta"]["pre_tokenizer"]
    assert rep["merge"]["max_abs_vs_base"] > rep["merge"]["tolerance"]
    # A real model is held to the fact: PyTorch's answer and the artifact's both contain it.
    assert rep["smoke"]["fact"] == FACT and FACT in rep["smoke"]["reference_answer"]
    assert row["smoke"]["has_fact"] and FACT in row["smoke"]["answer"] and row["smoke"]["agreement_min"] is None
    assert rep["smoke"]["retrieved_has_needle"]
    # The device path, outside the build: retrieve, template, generate.
    build_index(DEMO_DOCS, tmp_path / "retriever")
    with Retriever.open(tmp_path / "retriever") as r:
        hits = r.search(QUESTION, k=2)
    assert any(NEEDLE in h.text for h in hits)
    rt = get("gguf").load(tmp_path / "dist" / row["path"])
    gen = rt.generate(rag.messages(QUESTION, hits), max_new_tokens=40)
    rt.close()
    assert FACT in gen.text, gen.text
    assert json.loads((tmp_path / "dist" / "report.json").read_text())["model"]["architecture"] == "LlamaForCausalLM"
    # A fact the fine-tuned model itself does not give is bad input, refused before any export is checked.
    with pytest.raises(UsageError, match="does not contain '7 trillion'"):
        build(BuildRequest(model=str(smollm2 / "model"), adapters={"adapter": str(smollm2 / "adapter")},
                           formats={"gguf": ["Q8_0"]}, out=tmp_path / "dist2", docs=DEMO_DOCS, cache_dir=cache,
                           smoke_question=QUESTION, smoke_answer="7 trillion"))
    assert not (tmp_path / "dist2").exists()


@pytest.mark.parametrize("answer,fact,stated", [
    ("Phi-4-mini is a 3.8B-parameter model", "3.8", True),
    ("a parameter count of 3.8 billion", "3.8", True),
    ("Phi-4-mini has 232 Transformer layers", "32", False),     # a 4-bit SmolLM2 answer: not "32"
    ("each with 320 parameters", "32", False),
    ("13.8 units", "3.8", False),
    ("It has 32 layers.", "32", True),
    ("llama.cpp calls it GPT-4o.", "gpt-4o", True),
    ("a 200,064-token vocabulary", "200,064", True),
])
def test_a_fact_is_stated_as_a_whole_number_or_word(answer, fact, stated):
    from phiedge.checks import states
    assert states(answer, fact) is stated
