"""GGUF for llama.cpp: llama.cpp's own converter and quantizer, version-matched to the installed runtime.

- The converter (`convert_hf_to_gguf.py` + its `conversion/` package + `gguf-py`) comes from the sdist of the
  installed `llama-cpp-python`, so the file format always matches the llama.cpp that will load it. It is
  fetched once with pip into the phiedge cache (the registry is the only network a build box may have).
- The converter refuses any tokenizer whose pre-tokenizer hash it does not know (every fine-tuned or
  resized vocabulary). We decide the pre-tokenizer from the tokenizer's own definition instead (its split
  regex, table below) and log the decision; an unknown regex is still an error.
- Quantization runs llama.cpp's `llama_model_quantize` from the same build, in a subprocess.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..calibration import DEFAULT_TOKENS
from ..errors import ToolchainError
from ..source import checkpoint_dtype
from .base import TOOL_BYTES, Artifact, Exporter, register, run_tool
from .grammar import Grammar

log = logging.getLogger(__name__)

# tokenizer.json split regex -> llama.cpp pre-tokenizer name (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*).
PRE_TOKENIZER_BY_REGEX = {
    # o200k (GPT-4o, Phi-4-mini)
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "gpt-4o",
    # cl100k / Llama 3
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    # GPT-2 byte-level default (ByteLevel use_regex=True)
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+": "gpt2",
}
# Output precision -> (converter --outtype, llama_ftype for the quantizer or None when the converter writes it).
PRECISION_PLAN = {
    "F32": ("f32", None),
    "F16": ("f16", None),
    "BF16": ("bf16", None),
    "Q8_0": ("q8_0", None),
    "Q6_K": (None, 18),
    "Q5_K_M": (None, 17),
    "Q5_K_S": (None, 16),
    "Q4_K_M": (None, 15),
    "Q4_K_S": (None, 14),
    "Q4_0": (None, 2),
}
# Option tokens of the quantizer's levels (`Q4_K_M-imat-emb8`): `imat` quantizes with an importance matrix from
# the --docs documents (phiedge.exporters._llama_imatrix), `emb8` / `emb6` set the output tensor's type (the
# embedding's too when it is tied, as in Phi-4-mini and SmolLM2) to Q8_0 / Q6_K; without one llama.cpp chooses
# (Q6_K at Q4_K_M / Q5_K_M where the width is a multiple of 256, else Q8_0).
QUANT_TOKENS = {"imat": ("imatrix", True), "emb8": ("output", 8), "emb6": ("output", 14)}   # ggml_type ids
IMATRIX_SEQ_LEN = 512           # llama-imatrix's default chunk
# The importance matrix's PyTorch pass: the fp32-arithmetic forward the smoke reference also runs (9.9 GB at full
# size), over the calibration sample in windows of IMATRIX_SEQ_LEN.
IMATRIX_PEAK_PER_PARAM = 2.6
# The converter's outtype for the quantizer's source, by the checkpoint's stored dtype (others: f16).
SOURCE_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
ADAPTER_FILE = "adapter.gguf"


def _tokenizer(model_dir: Path) -> tuple[dict, list[dict]]:
    """tokenizer.json and its pre-tokenizers as a flat list."""
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pre = tj.get("pre_tokenizer") or {}
    return tj, pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]


def decide_pre_tokenizer(model_dir: Path) -> str | None:
    """llama.cpp pre-tokenizer name from tokenizer.json's split regex, or None if not a known regex."""
    _, stack = _tokenizer(model_dir)
    for p in stack:
        if p.get("type") == "Split":
            regex = p.get("pattern", {}).get("Regex")
            if regex in PRE_TOKENIZER_BY_REGEX:
                return PRE_TOKENIZER_BY_REGEX[regex]
        if p.get("type") == "ByteLevel" and p.get("use_regex", True) and len(stack) == 1:
            return "gpt2"
    return None


def decide_vocab(model_dir: Path) -> str | None:
    """`gpt2` when tokenizer.json is a byte-level BPE (Phi-4-mini's o200k, GPT-2, Llama 3, SmolLM2), the
    converter's GPT-2/BPE path; None leaves the choice to the converter (SentencePiece models). Read from the
    tokenizer itself: the class name in tokenizer_config.json says "TokenizersBackend" for every tokenizer that
    transformers >= 5 saves."""
    tj, stack = _tokenizer(model_dir)
    if (tj.get("model") or {}).get("type") != "BPE":
        return None
    byte_level = any(p.get("type") == "ByteLevel" for p in stack) or \
        (tj.get("decoder") or {}).get("type") == "ByteLevel"
    return "gpt2" if byte_level else None


def llama_cpp_version() -> str:
    try:
        import llama_cpp
    except ImportError:
        raise ToolchainError("llama-cpp-python is not installed: pip install 'phiedge[gguf]'") from None
    return llama_cpp.__version__


def cache_dir() -> Path:
    return Path(os.environ.get("PHIEDGE_CACHE", Path.home() / ".cache" / "phiedge"))


def converter_dir() -> Path:
    """llama.cpp's converter for the installed llama-cpp-python, fetched from its sdist once."""
    ver = llama_cpp_version()
    dest = cache_dir() / f"llama.cpp-{ver}"
    if all((dest / p).exists() for p in CONVERTER_PARTS):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching llama.cpp's converter from the llama-cpp-python %s sdist", ver)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={ver}", "-d", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            raise ToolchainError(f"could not download the llama-cpp-python {ver} sdist for its converter "
                                 f"({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'no output'}): "
                                 f"check access to PyPI, or unpack the sdist's vendor/llama.cpp into {dest}")
        stage = Path(tmp) / "stage"
        with tarfile.open(sdists[0]) as tf:
            prefix = f"{sdists[0].name[:-len('.tar.gz')]}/vendor/llama.cpp/"
            members = [m for m in tf.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].split("/")[0] in CONVERTER_PARTS]
            for m in members:
                m.name = m.name[len(prefix):]
            tf.extractall(stage, members=members, filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        stage.rename(dest)
    return dest


@register
class GGUFExporter(Exporter):
    name = "gguf"
    GRAMMAR = Grammar("gguf", bases=tuple(PRECISION_PLAN), tokens=QUANT_TOKENS, order=("imatrix", "output"),
                      option_bases=frozenset(p for p, (outtype, _) in PRECISION_PLAN.items() if outtype is None),
                      takes_options="only the quantizer's levels (Q6_K ... Q4_0) take options",
                      options_hint="the quantizer's levels take options, e.g. Q4_K_M-imat-emb8")
    DEFAULT_PRECISION = "Q4_K_M"
    TOOL_4BIT = "Q4_K_M"
    SWEEP = ("Q4_K_M", "Q4_K_M-imat", "Q4_K_M-imat-emb8", "Q4_K_S-imat", "Q5_K_S-imat", "Q5_K_M-imat", "Q6_K-imat",
             "Q8_0")
    CLI_FLAG = "--gguf-quant"
    CLI_HELP = "GGUF levels, e.g. F16,Q8_0,Q4_K_M"
    ADAPTER_RUNTIME = "llama.cpp"
    TOOL_MODULES = ("phiedge.exporters._llama_convert", "phiedge.exporters._llama_quantize",
                    "phiedge.exporters._llama_imatrix", "phiedge.calibration",
                    "phiedge.exporters._llama_lora", "phiedge.adapters")
    # At 3.84 B, Q4_K_M, one tool at a time (max RSS of the largest child): from a bf16 conversion 5.29 GB in
    # 228 s; from f16 4.29 GB / 217 s, from f32 4.29 GB / 207 s (and a 15.3 GB intermediate on disk).
    PEAK_BYTES_PER_PARAM = 1.4
    BYTES_PER_PARAM = {"F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 1.07, "Q6_K": 0.83, "Q5_K_M": 0.72,
                       "Q5_K_S": 0.70, "Q4_K_M": 0.62, "Q4_K_S": 0.59, "Q4_0": 0.57}

    def toolchain(self) -> dict[str, str]:
        return {"llama-cpp-python": llama_cpp_version()}

    def tensors(self, art: Artifact) -> list[tuple[str, int]]:
        sys.path[:0] = [str(converter_dir() / "gguf-py")]
        try:
            import gguf
            return [(t.name, int(t.n_bytes)) for t in gguf.GGUFReader(art.path / "model.gguf").tensors]
        finally:
            del sys.path[0]

    def calibrates(self, precisions: list[str]) -> bool:
        return any(self.parse(p).value("imatrix") for p in precisions)

    def _needs(self, precisions: list[str], calibration: bool, settings: dict) -> list[str]:
        def plain(p):
            prec = self.parse(p)
            return "-".join([prec.base, *(t for g, t in prec.given if g != "imatrix")])
        return [f"gguf {p}: the importance matrix is computed on the documents: pass --docs, or build {plain(p)} "
                f"(--gguf-quant {plain(p)})" for p in precisions if not calibration and self.parse(p).value("imatrix")]

    def peak_bytes(self, n_params: int, precision: str) -> int:
        per_param = IMATRIX_PEAK_PER_PARAM if self.parse(precision).value("imatrix") else self.PEAK_BYTES_PER_PARAM
        return int(per_param * n_params) + TOOL_BYTES

    def export(self, merged_dir: Path, out_dir: Path, precisions: list[str], settings: dict) -> list[Artifact]:
        precisions = self.check_precisions(precisions)
        conv = converter_dir()
        pre, vocab = decide_pre_tokenizer(merged_dir), decide_vocab(merged_dir)
        log.info("gguf: from tokenizer.json: vocabulary %s, pre-tokenizer %s", vocab or "left to the converter",
                 pre or "left to the converter")
        work = out_dir / ".work"
        work.mkdir(parents=True, exist_ok=True)
        # The quantizer's source: full precision in the checkpoint's own float type, bf16 kept bf16 (exact; an
        # f32 intermediate of Phi-4-mini is 15.3 GB, twice the bf16 one's 7.7 GB).
        base_type = SOURCE_TYPES.get(checkpoint_dtype(merged_dir), "f16")
        converted: dict[str, Path] = {}
        imatrix: dict = {}
        artifacts = []
        for name in precisions:
            prec = self.parse(name)
            outtype, ftype = PRECISION_PLAN[prec.base]
            if outtype is None:
                outtype = base_type
            if outtype not in converted:
                converted[outtype] = self._convert(conv, merged_dir, work / f"model-{outtype}.gguf", outtype,
                                                   vocab, pre)
            meta = {"vocab": vocab, "pre_tokenizer": pre, "converted_as": outtype,
                    "llama_cpp_python": llama_cpp_version()}
            if prec.value("imatrix") and not imatrix:
                imatrix = self._imatrix(conv, merged_dir, converted[outtype], work / "imatrix.gguf", settings)
            tmp = out_dir / f"{name}.partial"
            tmp.mkdir(parents=True, exist_ok=True)
            if ftype is None:
                shutil.copyfile(converted[outtype], tmp / "model.gguf")
            else:
                self._quantize(conv, converted[outtype], tmp / "model.gguf", ftype,
                               int(settings.get("threads", os.cpu_count() or 1)),
                               imatrix.get("file") if prec.value("imatrix") else None, prec.value("output"))
                meta["output_type"] = {8: "Q8_0", 14: "Q6_K"}.get(prec.value("output"), "llama.cpp's choice")
                if prec.value("imatrix"):
                    meta["imatrix"] = imatrix["record"]
            artifacts.append(self.finish(tmp, out_dir / name, name, ("model.gguf",), meta, f"llama.cpp ({name})"))
        shutil.rmtree(work, ignore_errors=True)
        return artifacts

    def export_adapter(self, base_dir: Path, adapter_dir: Path, out_dir: Path) -> tuple[str, ...]:
        """The PEFT adapter as llama.cpp's LoRA file (ADAPTER_FILE in `out_dir`), for any GGUF of this base:
        llama.cpp's own convert_lora_to_gguf.py (same sdist as the model converter), on a copy of the adapter whose
        per-module scaling is folded into lora_B (phiedge.adapters), fp32. Returns the files written."""
        from ..adapters import fold_scales
        conv = converter_dir()
        work = out_dir / ".work"
        shutil.rmtree(work, ignore_errors=True)
        fold_scales(adapter_dir, work / "peft", "llama.cpp")
        # The converter reads the base's config only, but indexes any weight files beside it: give it the config.
        (work / "base").mkdir()
        shutil.copyfile(base_dir / "config.json", work / "base" / "config.json")
        tmp = out_dir / f"{ADAPTER_FILE}.partial"
        run_tool([sys.executable, "-m", "phiedge.exporters._llama_lora", str(conv), "--base", str(work / "base"),
                  "--outtype", "f32", "--outfile", str(tmp), str(work / "peft")], "llama.cpp LoRA converter")
        tmp.rename(out_dir / ADAPTER_FILE)
        shutil.rmtree(work, ignore_errors=True)
        return (ADAPTER_FILE,)

    @staticmethod
    def _convert(conv: Path, merged_dir: Path, out: Path, outtype: str, vocab: str | None, pre: str | None) -> Path:
        tmp = out.with_name(out.name + ".partial")
        run_tool([sys.executable, "-m", "phiedge.exporters._llama_convert", str(conv), vocab or "", pre or "",
              str(merged_dir), "--outfile", str(tmp), "--outtype", outtype],
             f"llama.cpp converter ({outtype})")
        tmp.rename(out)
        return out

    @staticmethod
    def _imatrix(conv: Path, merged_dir: Path, converted: Path, out: Path, settings: dict) -> dict:
        """llama.cpp's importance matrix of the checkpoint over the calibration sample of the documents."""
        texts = [t for t in (settings.get("calibration_text") or []) if t and t.strip()]
        budget = int(settings.get("calibration_tokens") or DEFAULT_TOKENS)
        job = out.with_suffix(".job.json")
        job.write_text(json.dumps({"model": str(merged_dir), "gguf": str(converted), "out": str(out), "texts": texts,
                                   "seq_len": IMATRIX_SEQ_LEN, "budget": budget}))
        ran = run_tool([sys.executable, "-m", "phiedge.exporters._llama_imatrix", str(conv), str(job)],
                       "importance matrix (PyTorch)")
        record = {**json.loads(out.with_suffix(".json").read_text()), "budget": budget,
                  "peak_rss_mb": ran["peak_rss_mb"]}
        log.info("gguf: importance matrix over %d tokens (%d windows) in %.0f s, calibration sha256 %s",
                 record["tokens"], record["windows"], record["seconds"], record["sha256"][:12])
        return {"file": out, "record": record}

    @staticmethod
    def _quantize(conv: Path, src: Path, dest: Path, ftype: int, threads: int, imatrix: Path | None,
                  output_type: int | None) -> None:
        extra = ["--imatrix", str(imatrix), "--llama-dir", str(conv)] if imatrix else []
        extra += ["--output-type", str(output_type)] if output_type is not None else []
        run_tool([sys.executable, "-m", "phiedge.exporters._llama_quantize", str(src), str(dest), str(ftype),
                  str(threads), *extra], f"llama.cpp quantize (ftype {ftype})")
