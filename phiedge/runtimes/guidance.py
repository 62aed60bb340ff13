"""JSON-schema constraints, one engine for every runtime: llguidance.

    grammar = compile_schema(schema, "gguf")      # UsageError, before any model loads, for a keyword it cannot hold
    guide = Guide(tokenizer(...), grammar, fmt)   # per generation (phiedge.runtimes.base Runtime._choose)
    token = runtime._pick(guide.mask(logits)); guide.consume(token)

onnxruntime-genai's guidance is llguidance inside the runtime (phiedge.runtimes.onnx, held to the same options);
GGUF, OpenVINO and MLX run it here as a logits processor on the runtime's own logits and vocabulary. Chosen over:
- llama-cpp-python's GBNF converter (`LlamaGrammar.from_json_schema`, 0.3.36), which lets raw control characters
  into strings (its string rule is `[^"\\]`) and drops numeric bounds and unknown formats without a word;
- OpenVINO GenAI's structured output (XGrammar inside 2026.4), which warns and ignores the keywords it does not
  implement (`uniqueItems` came back generated, not refused) and allows free whitespace, which a model that likes
  it spends the whole budget on (every row of tests/test_schemas.py was cut on the random model).
llguidance enforces minimum / maximum, lengths, patterns, multipleOf and the formats it knows, and refuses every
keyword it does not implement (`lenient` off), so a schema ends in an answer that validates, an answer cut at the
token limit, or a one-line refusal before generation: tests/test_schemas.py holds that table on a randomly
initialised model, on every runtime.

Device-path module: llguidance and numpy, imported when a constraint is asked for.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UsageError

# Compact JSON: no free whitespace between tokens (a model that likes newlines spends the budget on them).
OPTIONS = {"whitespace_flexible": False}


def _import(fmt: str):
    try:
        import llguidance
    except ImportError:
        raise UsageError(f"constrained generation on the {fmt} runtime needs llguidance: "
                         f"pip install 'phiedge[{fmt}]'") from None
    return llguidance


def tokenizer(path: Path, n_vocab: int, eos: list[int], fmt: str):
    """llguidance's tokenizer from an artifact's tokenizer.json; rows past it (a padded vocabulary) are never
    allowed, every id in `eos` ends the answer."""
    llg = _import(fmt)
    return llg.LLTokenizer(Path(path).read_text(), n_vocab=n_vocab, eos_token=eos)


def tokenizer_from_llama(vocab, n_vocab: int, eos: list[int]):
    """llguidance's tokenizer from a loaded GGUF's own vocabulary (llama.cpp's tokenizer; ~1 s at 200,064)."""
    _import("gguf")
    from llguidance.llamacpp import lltokenizer_from_vocab
    return lltokenizer_from_vocab(vocab, n_vocab=n_vocab, eos_token=eos)


def compile_schema(schema: dict, fmt: str) -> str:
    """llguidance's grammar for `schema` (JSON without free whitespace); a schema it cannot hold whole is refused in
    one line naming the keyword, before anything is generated."""
    llg = _import(fmt)
    grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=OPTIONS)
    error = llg.LLMatcher.validate_grammar(grammar)
    if error:
        raise UsageError(refusal(fmt, error))
    return grammar


def refusal(fmt: str, error: str) -> str:
    """One line for a schema the runtime cannot enforce (llguidance's message names the keyword)."""
    error = " ".join(str(error).split())
    return (f"the {fmt} runtime cannot hold answers to this JSON schema ({error}): drop or rewrite that keyword "
            f"(docs/json-output.md lists what each runtime enforces)")


class Guide:
    """One constrained generation: which tokens the schema allows next, and the tokens the runtime picked."""

    def __init__(self, tokenizer, grammar: str, fmt: str):
        llg = _import(fmt)
        self.matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise UsageError(refusal(fmt, self.matcher.get_error()))

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of one position's logits with every token the schema forbids at -inf."""
        from llguidance.numpy import allocate_token_bitmask, apply_token_bitmask_inplace, fill_next_token_bitmask
        out = np.array(logits, dtype=np.float32)[None]
        bits = allocate_token_bitmask(1, out.shape[-1])
        fill_next_token_bitmask(self.matcher, bits)
        apply_token_bitmask_inplace(out, bits)
        return out[0]

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise UsageError(f"llguidance refused token {token} it had allowed ({self.matcher.get_error()}): "
                             f"report this with the schema")
