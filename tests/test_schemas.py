"""Every runtime's JSON-schema constraint on the harshest model there is: the tiny Phi randomly initialised
(scripts/make_tiny_phi.py's model-random), which has no preference for well-formed text. Each schema, asked with
two prompts, must end in one of three outcomes on every runtime:

  valid    the answer parses and validates against the schema;
  cut      --max-tokens ended the answer before its JSON closed (reported as cut, never as an answer);
  refused  the runtime's constraint cannot hold a keyword, and says so in one line before generating.

An answer that breaks its schema fails the table. The artifacts are the random model's full-precision exports
(GGUF F16, ONNX fp32, OpenVINO fp16, MLX fp16) through the build's own exporters, not gated: a constraint does
not depend on the precision, and the parity gate (which a random model has nothing to prove against) is not what
this tests.
"""
from __future__ import annotations

import json

import pytest

from conftest import THREADS, installed
from phiedge import exporters, rag, tools
from phiedge.errors import UsageError
from phiedge.runtimes import RuntimeSettings, get

FULL = {"gguf": "F16", "onnx": "fp32", "openvino": "fp16", "mlx": "fp16"}
PROMPTS = ("What does the pass statement do?", "Rate the with statement from -1 to 1, and say why.")
MAX_TOKENS = 96
SHORT = {"type": "string", "maxLength": 16}


def obj(properties: dict, required: list[str] | None = None, **more) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, "additionalProperties": False, **more}


# (id, schema, why the row is here, outcomes allowed besides `valid`). Every row may end `cut` on a random model;
# a row listing `refused` is one some runtime's constraint cannot hold.
SCHEMAS = [
    ("issue-newline-in-string", obj({"answer": {"type": "string", "maxLength": 40},
                                     "confidence": {"type": "integer", "minimum": 0, "maximum": 10}}),
     "llama-cpp-python's GBNF converter let a raw newline into a string (issue 33, first example)"),
    ("issue-number-range", obj({"score": {"type": "number", "minimum": -1, "maximum": 1}}),
     "the converter dropped numeric bounds: 1010101010101010 for [-1, 1] (issue 33, second example)"),
    ("string-maxlength", obj({"summary": {"type": "string", "minLength": 2, "maxLength": 24}}),
     "a free string, bounded: control characters and the length are the constraint's to hold"),
    ("enum-and-boolean", obj({"city": {"enum": ["Paris", "London", "Oslo"]}, "sunny": {"type": "boolean"}}),
     "a closed set and a literal"),
    ("integer-exclusive-range", obj({"n": {"type": "integer", "exclusiveMinimum": 0, "maximum": 99},
                                     "m": {"type": "integer", "minimum": -5, "exclusiveMaximum": 5}}),
     "integer bounds, both kinds"),
    ("number-range-multiple", obj({"p": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25}}),
     "a bounded number whose digits are bounded too"),
    ("nested-optional", obj({"user": obj({"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                          "email": SHORT}, required=["name"]),
                             "note": SHORT}, required=["user"]),
     "nested objects, additionalProperties false, optional fields"),
    ("array-in-object", obj({"items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                       "minItems": 1, "maxItems": 3}}),
     "an array's length bounds"),
    ("top-level-array", {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 3},
     "an answer that is a list"),
    ("pattern", obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
     "a regular expression on a string"),
    ("unique-items", {"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": True, "maxItems": 3},
     "a keyword no token mask can hold: refused before generating, never ignored"),
]


@pytest.fixture(scope="module")
def random_artifacts(tiny, tmp_path_factory) -> dict:
    """Each installed runtime's full-precision export of the randomly initialised model."""
    root = tmp_path_factory.mktemp("random")
    out = {}
    for fmt, precision in FULL.items():
        if installed(fmt):
            (art,) = exporters.get(fmt).export(tiny / "model-random", root / fmt, [precision], {"threads": int(THREADS)})
            out[fmt] = art.path
    return out


def outcome(rt, schema: dict, prompt: str) -> tuple[str, str]:
    """(valid | cut | refused | broken, what happened) for one question, as `ask --json-schema` answers it."""
    try:
        type(rt).check_schema(schema)
    except UsageError as e:
        return "refused", str(e)
    gen = rt.generate(rag.messages(prompt, []), MAX_TOKENS, constraint=schema)
    value, problems = tools.check_json(gen.text, schema, cut=not gen.stopped)
    if not problems:
        return "valid", gen.text
    return ("cut" if not gen.stopped and value is None else "broken"), f"{gen.text!r}: {problems}"


@pytest.mark.parametrize("fmt", sorted(FULL))
def test_every_schema_ends_valid_cut_or_refused_on_a_random_model(random_artifacts, fmt):
    if fmt not in random_artifacts:
        pytest.fail(f"{fmt}'s runtime is not installed: make install")
    rt = get(fmt).load(random_artifacts[fmt], RuntimeSettings(threads=int(THREADS)))
    try:
        table = {(name, p): outcome(rt, schema, p) for name, schema, _ in SCHEMAS for p in PROMPTS}
    finally:
        rt.close()
    report = "\n".join(f"{name} / {p[:20]}: {kind}: {what[:300]}" for (name, p), (kind, what) in table.items())
    assert not [k for k, (kind, _) in table.items() if kind == "broken"], report
    for (name, _), (kind, what) in table.items():
        if kind == "refused":
            assert "\n" not in what and "JSON schema" in what, what
    # The rows a token mask can hold are held; the one it cannot is refused, never generated.
    assert {kind for (name, _), (kind, _) in table.items() if name == "unique-items"} == {"refused"}, report
    held = [k for k, (kind, _) in table.items() if k[0] != "unique-items"]
    assert not [k for k in held if table[k][0] == "refused"], report
    # Bounded schemas close well inside the budget: a cut is the exception, not the rule.
    assert sum(table[k][0] == "valid" for k in held) >= 0.75 * len(held), report


@pytest.mark.parametrize("fmt", ["gguf", "openvino", "mlx"])
def test_inside_a_string_the_mask_allows_no_control_character(random_artifacts, fmt):
    """The issue's raw newline, whatever the model prefers: after `{"answer":"` llguidance's mask over the
    runtime's own vocabulary (llama.cpp's for GGUF, tokenizer.json for OpenVINO and MLX) allows hundreds of
    tokens, none holding a byte below 0x20 (llama-cpp-python's GBNF string rule `[^"\\]` allowed them all)."""
    import numpy as np

    from phiedge.runtimes import guidance
    schema = SCHEMAS[0][1]
    path = random_artifacts[fmt]
    rt = get(fmt).load(path, RuntimeSettings(threads=int(THREADS)))
    try:
        n = getattr(rt, "n_vocab", None) or json.loads((path / "config.json").read_text())["vocab_size"]
        tok = rt._llg_tokenizer(n)
        guide = guidance.Guide(tok, guidance.compile_schema(schema, fmt), fmt)
        for t in tok.tokenize_str('{"answer":"'):
            guide.consume(t)
        allowed = np.flatnonzero(np.isfinite(guide.mask(np.zeros(n, dtype=np.float32))))
    finally:
        rt.close()
    pieces = [tok.decode_bytes([int(t)]) for t in allowed]
    assert len(pieces) > 100 and b'"' in pieces, len(pieces)
    assert not [p for p in pieces if any(b < 0x20 for b in p)]
