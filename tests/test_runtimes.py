"""The runtime contract, once for every registered runtime, on the session build's real artifacts:
every precision passes both LongRoPE regimes (with each artifact's own measured bounds), tokenizer and
template equal Hugging Face's, generation stops at the end token and honours the base loop's contract, the
device path imports no torch, and each exporter refuses what its grammar refuses."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tokenizers import Tokenizer

from conftest import SESSION, assert_pytorch_tokens, installed, run_cli
from phiedge import build, chat, errors, exporters, runtimes
from phiedge.checks import probes
from phiedge.runtimes import RuntimeSettings, get

FORMATS = sorted(runtimes.REGISTRY)
pytestmark = pytest.mark.slow

# Files every artifact folder of a format holds (what its runtime and plain tools load).
FILES = {
    "gguf": ("model.gguf",),
    "onnx": ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "chat_template.jinja"),
    "openvino": ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml",
                 "chat_template.jinja", "generation_config.json", "phiedge_openvino.json"),
    "mlx": ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"),
}
# (format, precision) -> (top1 at least, max|Δ| below, KL below) in both regimes, where a tighter bound than the
# gate's was measured on the tiny fixture -- why each is there:
BOUNDS = {
    ("gguf", "F32"): (0.97, None, 1e-5),        # exact weights; llama.cpp's f16 KV cache is the only error
    ("onnx", "fp32"): (1.0, 1e-3, 1e-8),        # measured 2e-5 / 2e-12 in both regimes
    # 16-bit runtimes: top-1 0.95, as one near-tie of the random tiny model's 64 compared positions may flip on
    # another CPU (CI's: mlx fp16 63/64 at KL 5e-6); KL and max|Δ| are the bounds that catch a real fault.
    ("openvino", "fp16"): (0.95, 0.05, 1e-5),   # 0.0053 / 0.0084; OpenVINO's own fp16 IR (rope in fp16): 2.31
    # MLX's CPU fp16 kernels round differently by CPU: 0.030 / 0.034 (KL 5e-6) here, 0.126 (KL 1.3e-5) on CI's.
    ("mlx", "fp16"): (0.95, 0.2, 1e-4),
    ("mlx", "4bit"): (0.0, None, 0.02),         # the 8-bit embedding: 0.0059 / 0.010
}
# (format, smaller, larger, at most this share of the larger's size)
SIZES = [("onnx", "int4", "fp32", 0.6), ("openvino", "int4", "fp16", 0.45), ("mlx", "4bit", "fp16", 0.5)]
# The artifact of each format that the tokenizer, generation and device-path checks run on.
PROBE_ARTIFACT = {"gguf": "Q8_0", "onnx": "int4", "openvino": "int4", "mlx": "4bit"}
MESSAGES = [{"role": "system", "content": "Context: x = 3.5 (see __init__).", "tools": '[{"name": "f"}]'},
            {"role": "user", "content": "Don't guess — what's  x? <|tool_call|> stays one token.\n"}]


def _skip_missing(fmt: str) -> None:
    if not installed(fmt):
        pytest.skip(f"{fmt}'s runtime is not installed")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_precision_passes_both_regimes(session, fmt):
    _skip_missing(fmt)
    rows = session.rows(fmt)
    assert [a["precision"] for a in rows] == SESSION[fmt]
    switch = session.switch
    for i, a in enumerate(rows):
        assert a["passed"] and not a["failures"], a["failures"]
        # One real long prefill per format (the first precision); the others' long regime on the span, past the
        # switch, where the runtime takes position spans.
        spans = i > 0 and get(fmt).POSITION_SPANS
        assert a["parity"]["short"]["start"] == 0
        assert (a["parity"]["long"]["start"] > switch - probes.LONG_SPAN) if spans else a["parity"]["long"]["start"] == 0
        for regime in ("short", "long"):
            m = a["parity"][regime]
            assert m["positions"] == probes.COMPARE_LAST
            top1, max_abs, kl = BOUNDS.get((fmt, a["precision"]), (0.0, None, float("inf")))
            assert m["top1"] >= top1 and m["kl"] < kl and (max_abs is None or m["max_abs"] < max_abs), (a["path"], m)
        for f in FILES[fmt]:
            assert (session.bundle / a["path"] / f).is_file(), f
        if a["full_precision"]:
            assert_pytorch_tokens(a["greedy"])
    for f, small, large, share in SIZES:
        if f == fmt:
            assert session.row(fmt, small)["size_bytes"] < share * session.row(fmt, large)["size_bytes"]


def test_format_specific_records(session):
    """What each exporter records of how it built the artifact."""
    if installed("gguf"):
        sizes = [a["size_bytes"] for a in session.rows("gguf")]
        assert sizes == sorted(sizes, reverse=True), "each GGUF level is smaller than the one before"
        assert session.row("gguf", "Q8_0")["meta"]["pre_tokenizer"] == "gpt-4o"
        assert session.row("gguf", "Q8_0")["meta"]["vocab"] == "gpt2"
    if installed("onnx"):
        for a in session.rows("onnx"):
            assert a["meta"]["execution_provider"] == "cpu" and a["meta"]["export_seconds"] > 0
        mixed, plain = session.row("onnx", "int4-k_quant-mixed8"), session.row("onnx", "int4")
        assert mixed["meta"]["builder_options"] == ["algo_config=k_quant",
                                                    "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8"]
        for regime in ("short", "long"):        # the 8-bit LM head / sensitive layers cut int4's loss
            assert mixed["parity"][regime]["kl"] < plain["parity"][regime]["kl"]
    if installed("openvino"):
        for a in session.rows("openvino"):     # exact f32 settings for full precision, OpenVINO's defaults for int8/int4
            exact = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
            assert a["meta"]["cpu_properties"] == (exact if a["full_precision"] else {}), a["precision"]
            assert a["meta"]["export_seconds"] > 0
        c = session.row("openvino", "int4")["meta"]   # plain int4, --docs or not: data-free AWQ
        assert c["compression"]["awq"] == "data-free" and not c["compression"]["scale_estimation"]
        assert c["compression"]["calibration_samples"] == 0 and not c["calibration_documents"]
        assert c["compression"]["group_size"] == 128
        assert session.row("openvino", "int8")["meta"]["compression"]["mode"] == "int8_asym"
    if installed("mlx"):
        q4 = session.row("mlx", "4bit")
        assert q4["meta"]["embedding_bits"] == 8 and q4["meta"]["quantization"]["group_size"] == 64


# Runtimes that score on an engine of their own beside the one that generates (Runtime.SCORES_APART): the
# attribute each engine lives in, and the method a generation starts in.
APART = {"onnx": ("int4-k_quant-mixed8", "_rows_session", "_model", "_start"),
         "openvino": ("int4", "_compiled", "_pipe", "_stream")}


@pytest.mark.parametrize("fmt", sorted(APART))
def test_a_check_never_holds_the_scoring_engine_and_the_generator_together(session, fmt):
    """A check scores first (both probes, then each answer -- the short probe's continuation, the RAG smoke, the
    tool-call smoke -- teacher-forced in one prefill of prompt + answer),
    lets the scoring engine go, and only then loads the generator: at full size ONNX's two together peaked at
    13.3 GB, OpenVINO's at 11.55 GB. The runtime here is the real one, watched at each call; what it measures is
    what the session build's check measured."""
    _skip_missing(fmt)
    from phiedge.checks.measure import ProbeSet, measure
    precision, scorer, generator, starts = APART[fmt]
    base = get(fmt)
    assert base.SCORES_APART
    seen = []

    def watched_start(self, *args):
        seen.append(("generate", bool(getattr(self, scorer))))
        return getattr(base, starts)(self, *args)

    def watched_logits(self, ids, last_n, start=0):
        seen.append(("score", getattr(self, generator) is not None))
        return base.logits(self, ids, last_n, start)

    Watched = type("Watched", (base,), {"logits": watched_logits, starts: watched_start})
    row = session.row(fmt, precision)
    smoke = next(p for p in session.cache.glob("smoke-ref-*/smoke.json")
                 if json.loads(p.read_text())["reference_tokens"] == row["smoke"]["reference"])
    rt = Watched.load(session.artifact(fmt, precision), RuntimeSettings(threads=1))
    probe_set = ProbeSet.from_reference(session.merged / "reference.npz", smoke,
                                        long_span=row["parity"]["long"]["start"] > 0)
    m = measure(rt, probe_set)
    rt.close()
    assert seen == [("score", False)] * 5 + [("generate", False)] * 3, seen
    assert list(m.smoke.forced) == row["smoke"]["forced_tokens"] and list(m.smoke.tokens) == row["smoke"]["tokens"]
    assert list(m.greedy.forced) == row["greedy"]["forced_tokens"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_tokenizer_and_template_match_hugging_face(session, fmt):
    _skip_missing(fmt)
    merged = session.merged / "merged"
    hf = Tokenizer.from_file(str(merged / "tokenizer.json"))
    template, specials = chat.load_template(merged)
    text = chat.render(template, MESSAGES, specials)
    rt = get(fmt).load(session.artifact(fmt, PROBE_ARTIFACT[fmt]))
    try:
        assert rt.chat_ids(MESSAGES) == hf.encode(text, add_special_tokens=False).ids
        assert rt.tokenize("<|tool_call|>") == [hf.token_to_id("<|tool_call|>")]      # special tokens stay atomic
        assert rt.chat_template == template
        assert {hf.token_to_id("<|end|>"), hf.token_to_id("<|endoftext|>")} <= rt.stop_ids()
    finally:
        rt.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_generation_follows_the_contract(session, fmt):
    """Chat generation stops at the end token; the base loop honours max_new_tokens and the caller's stop ids;
    a per-call adapter or constraint a runtime does not support is refused, not ignored."""
    _skip_missing(fmt)
    rt = get(fmt).load(session.artifact(fmt, PROBE_ARTIFACT[fmt]))
    try:
        gen = rt.generate([{"role": "user", "content": "What does the with statement do?"}], max_new_tokens=48)
        assert gen.prompt_tokens > 5 and gen.ids and gen.text.strip() and not set(gen.ids) & rt.stop_ids()
        assert gen.ttft_s > 0 and gen.text == rt.detokenize(gen.ids)
        ids = session.reference["short_ids"].tolist()
        three = rt.generate_ids(ids, 3, stop_ids=set())
        assert len(three.ids) == 3 and not three.stopped
        stopped = rt.generate_ids(ids, 8, stop_ids={three.ids[1]})
        assert stopped.ids == three.ids[:1] and stopped.stopped
        for option in ("adapter", "constraint"):
            if option not in rt.SUPPORTS:
                with pytest.raises(errors.UsageError, match=f"does not take a per-call {option}"):
                    rt.generate_ids(ids, 2, **{option: "x"})
        assert rt.device == "CPU" and rt.fallback_from is None
    finally:
        rt.close()


# Modules a device must not need, per format (mlx-lm itself imports transformers for its tokenizer code).
FORBIDDEN = {"gguf": ("torch", "transformers", "onnx_ir"), "onnx": ("torch", "transformers", "onnx_ir"),
             "openvino": ("torch", "transformers", "optimum", "nncf"), "mlx": ("torch", "peft", "accelerate", "onnx_ir")}


@pytest.mark.parametrize("fmt", FORMATS)
def test_device_path_imports_no_torch(session, fmt):
    """Loading, scoring, chatting, streaming and sampling need the runtime package only: no torch (simulated absent
    for MLX, whose own tokenizer code imports transformers). The session on top: tests/test_session.py."""
    _skip_missing(fmt)
    code = (
        "import sys\n"
        + ("sys.modules['torch'] = None\n" if fmt == "mlx" else "")
        + "from pathlib import Path\n"
        "from phiedge.runtimes import get\n"
        f"rt = get({fmt!r}).load(Path({str(session.artifact(fmt, PROBE_ARTIFACT[fmt]))!r}))\n"
        f"ids = {session.reference['short_ids'].tolist()!r}\n"
        "assert rt.logits(ids, 4).shape[0] == 4\n"
        "g = rt.generate([{'role': 'user', 'content': 'What does pass do?'}], max_new_tokens=4)\n"
        "assert g.prompt_tokens > 0\n"
        "from phiedge.runtimes import Sampling\n"                       # streamed and sampled too
        "stream = rt.tokens(ids, 4, sampling=Sampling(temperature=1.0, top_p=0.9, seed=1))\n"
        "assert len(list(stream)) == len(stream.generation().ids) > 0\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN[fmt]!r} and sys.modules[m] is not None]\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


# (format, precision spec, the part of the refusal that names the problem) -- why each is here:
REFUSED = [
    ("gguf", "Q3_XS", "no precision 'Q3_XS': known are F32"),                   # a level llama.cpp's quantizer lacks here
    ("gguf", "F16-imat", "only the quantizer's levels (Q6_K ... Q4_0) take options"),   # the converter's types
    ("gguf", "Q4_K_M-g32", "unknown option 'g32': known are imat, emb8, emb6"),  # an option llama.cpp's levels lack
    ("mlx", "4bit-embfp-gptq", "mlx-lm's GPTQ quantizes the embedding too: drop 'embfp'"),
    ("onnx", "int3", "no precision 'int3': known are fp32, fp16, int4"),        # unknown base precision
    ("onnx", "int4-b48", "unknown int4 option 'b48': known are b16"),           # block size the builder lacks
    ("onnx", "fp32-b64", "only int4 takes options"),                            # options on a float precision
    ("onnx", "int4-b64-b128", "'b64' and 'b128' both set the block"),           # two values for one option
    ("onnx", "int4-asym", "add -rtn or -k_quant"),      # builds, but the tied uint4 embedding fails to load
    ("onnx", "int4-head8", "add -rtn or -k_quant"),     # builds, but the tied 8-bit embedding names a missing initializer
    ("onnx", "int4-mixed8", "add -rtn or -k_quant"),    # the same missing initializer
    ("onnx", "int4-k_quant-head8-mixed8", "both set the head"),  # one output-layer / mixed-layer choice
    ("onnx", "fp16", "not built for execution provider 'cpu'"),   # CPU fp16 graph fails on the first decode step
    ("openvino", "int3", "no weight format 'int3': known are fp32, fp16, int8, int4"),   # unknown base
    ("openvino", "int4-g48", "unknown int4 option 'g48'"),                      # group size not in the table
    ("openvino", "fp16-sym", "only int4 takes options"),                        # options on a float format
    ("openvino", "int4-g64-g128", "'g64' and 'g128' both set the group"),       # two values for one option
    ("openvino", "int4-r0", "must be r1..r100"),                                # no weights in int4
    ("openvino", "int4-rtn-se", "'rtn' is data-free, 'se' needs data"),         # contradictory algorithms
    ("mlx", "int4", "no precision 'int4': known are fp32, fp16, bf16, 8bit, 4bit, mixed_4_6"),  # ONNX's name
    ("mlx", "3bit", "no parity gate is measured"),                              # mlx-lm has it, no measured gate yet
    ("mlx", "mixed_2_6", "no parity gate is measured"),                         # a recipe offered by mlx-lm
    ("mlx", "4bit-g48", "unknown option 'g48'"),                                # group size mlx-lm lacks
    ("mlx", "fp16-g32", "only quantized precisions take options"),              # options on a float precision
    ("mlx", "4bit-g32-g128", "'g32' and 'g128' both set the group"),            # two values for one option
]


@pytest.mark.parametrize("fmt,spec,message", REFUSED, ids=[f"{r[0]}-{r[1]}" for r in REFUSED])
def test_refused_precisions(fmt, spec, message):
    with pytest.raises(errors.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build.plan_formats([fmt], {fmt: [spec]})


# (format, precisions as given, canonical names: defaults dropped, options in group order, duplicates merged)
CANONICAL = [
    ("gguf", ["q4_k_m", "F16", "Q4_K_M"], ["Q4_K_M", "F16"]),
    ("onnx", ["FP32", "int4-b32-sym", "int4", "int4-acc4-b128-rtn"], ["fp32", "int4", "int4-b128-rtn-acc4"]),
    ("openvino", ["FP16", "int4-g128-asym-r100", "int4", "int4-se-sym-r80-g64"], ["fp16", "int4", "int4-g64-sym-r80-se"]),
    ("mlx", ["FP16", "4bit-g64-emb8", "4BIT", "4bit-emb4-g32"], ["fp16", "4bit", "4bit-g32-emb4"]),
]


@pytest.mark.parametrize("fmt,given,canonical", CANONICAL, ids=[c[0] for c in CANONICAL])
def test_canonical_names_drop_defaults(fmt, given, canonical):
    assert build.plan_formats([fmt], {fmt: given}) == {fmt: canonical}
    assert build.plan_formats([fmt], {}) == {fmt: [exporters.get(fmt).DEFAULT_PRECISION]}


def test_precision_options_reach_the_tools():
    from phiedge.checks.metrics import thresholds_for
    from phiedge.exporters.mlx import convert_args
    from phiedge.exporters.onnx import builder_options
    from phiedge.exporters.openvino import job_plan
    assert builder_options(exporters.get("onnx").parse("INT4-MIXED8-K_QUANT")) == (
        "algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8")
    assert builder_options(exporters.get("onnx").parse("int4")) == ()               # the builder's own defaults
    assert thresholds_for("int4-k_quant-head8") == thresholds_for("INT4")          # variants: their base's row
    o = job_plan(exporters.get("openvino").parse("int4-g64-sym-r80-awq"))["int4"]
    assert (o["group_size"], o["sym"], o["ratio"], o["awq"], o["data"]) == (64, True, 0.8, True, "explicit")
    plain, rtn = (job_plan(exporters.get("openvino").parse(p))["int4"] for p in ("int4", "int4-rtn"))
    assert (plain["awq"], plain["data"], rtn["awq"], rtn["data"]) == (True, "none", False, "none")
    assert not exporters.get("openvino").calibrates(["int4", "int4-rtn", "fp16"])   # docs stay out of its cache key
    assert exporters.get("openvino").calibrates(["int4", "int4-g64-se"])
    gptq, alone = (job_plan(exporters.get("openvino").parse(p))["int4"] for p in ("int4-g64-gptq", "int4-rtn-gptq"))
    assert (gptq["gptq"], gptq["awq"], gptq["data"]) == (True, True, "explicit")
    assert (alone["gptq"], alone["awq"]) == (True, False)
    assert exporters.get("openvino").calibrates(["int4-g64-gptq"]) and not plain["gptq"]
    ov, n = exporters.get("openvino"), 3_836_021_760
    assert ov.peak_bytes(n, "int4-g64-gptq") > ov.peak_bytes(n, "int4-g64") > 8.5e9     # GPTQ: 10.6 GB measured
    assert convert_args(exporters.get("mlx").parse("mixed_4_6-g32-embfp")) == [
        "--bits", "4", "--group-size", "32", "--embed-bits", "0", "--recipe", "mixed_4_6"]


# The CLI: one line, exit 1, for each format's refusal.
CLI = [
    ("onnx", "fp32,int3", "error: onnx has no precision 'int3': known are fp32, fp16, int4 (int4 takes options, e.g. "
                          "int4-b64-rtn-acc4) (set PHIEDGE_DEBUG=1 for the traceback)"),
    ("openvino", "fp16,int3", "error: openvino has no weight format 'int3': known are fp32, fp16, int8, int4 (int4 "
                              "takes options, e.g. int4-g64-sym-r80-awq) (set PHIEDGE_DEBUG=1 for the traceback)"),
    ("mlx", "fp16,5bit", "error: mlx precision '5bit' is not offered: no parity gate is measured for it on a real "
                         "model yet; use fp32, fp16, bf16, 8bit, 4bit, mixed_4_6 (set PHIEDGE_DEBUG=1 for the traceback)"),
]


@pytest.mark.parametrize("fmt,precisions,line", CLI, ids=[c[0] for c in CLI])
def test_cli_refuses_in_one_line(tmp_path, fmt, precisions, line):
    r = run_cli("build", "--model", "unused", "--formats", fmt, exporters.REGISTRY[fmt].CLI_FLAG, precisions,
                "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [line]


def _whole_head(fmt: str, rt, ids: list[int]):
    """The same prefill with the LM head over every row, by the runtime's own means (no slice)."""
    import numpy as np
    if fmt == "openvino":
        from phiedge.runtimes.openvino import IR, prefill_inputs
        req = rt.core.compile_model(str(rt.path / IR), rt.device, rt.properties).create_infer_request()
        req.infer(prefill_inputs(ids))
        return np.asarray(req.get_tensor("logits").data)[0]
    if fmt == "mlx":
        return np.array(rt.model(rt.mx.array([ids]))[0].astype(rt.mx.float32))
    raise AssertionError(f"no whole-head path for {fmt}")


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f in ("openvino", "mlx")])
def test_logits_for_the_compared_rows_only_are_the_whole_heads_rows(session, fmt):
    """OpenVINO and MLX run the LM head on the rows asked for (3.4 GB of a 4200-token probe's logits at
    Phi-4-mini's vocabulary are never made): those rows are the whole head's (to fp32 rounding: on some CPUs
    OpenVINO's int4 kernels block 8 rows differently from 799, 1e-6 apart; a wrong row is O(1) away)."""
    import numpy as np
    _skip_missing(fmt)
    assert get(fmt).ALL_ROW_LOGITS is False
    rt = get(fmt).load(session.artifact(fmt, PROBE_ARTIFACT[fmt]))
    try:
        ids = session.reference["short_ids"].tolist()
        rows = rt.logits(ids, 8)
        whole = _whole_head(fmt, rt, ids)
        assert whole.shape[0] == len(ids) and rows.shape == (8, whole.shape[1])
        np.testing.assert_allclose(rows, whole[-8:].astype(np.float32), rtol=0, atol=1e-4)
        if fmt == "openvino":
            assert rt._sliced
    finally:
        rt.close()
