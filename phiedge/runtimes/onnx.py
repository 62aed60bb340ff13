"""onnxruntime-genai: `og.Model` on the artifact folder, its own tokenizer, the artifact's own chat template.

LongRoPE: the builder's graph picks the short or long cos/sin cache with an `If` on the total length
(past + new tokens) of each run. `logits` is therefore one `append_tokens` of every id (one prefill), so a
4200-token probe sees 4200 and uses the long factors for all of it, as Hugging Face does. Appending a
long prompt in pieces that cross the switch would mix the two factor sets (tests/test_onnx.py shows the
gate failing that).

Device-path module: onnxruntime_genai, numpy, json and jinja2 (phiedge.chat); never torch or transformers.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import ToolchainError, UsageError
from .base import Runtime, RuntimeSettings, register

log = logging.getLogger(__name__)

# RuntimeSettings.device (or extra["execution_provider"]) -> (onnxruntime-genai provider name or None for
# its default CPU, the og.is_*_available check that must pass first or None).
PROVIDERS: dict[str, tuple[str | None, str | None]] = {
    "CPU": (None, None),
    "CUDA": ("cuda", "is_cuda_available"),
    "GPU": ("cuda", "is_cuda_available"),
    "DML": ("dml", "is_dml_available"),
    "WEBGPU": ("WebGPU", "is_webgpu_available"),
    "OPENVINO": ("OpenVINO", "is_openvino_available"),
    "QNN": ("QNN", "is_qnn_available"),
}


def _import_og():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise ToolchainError("onnxruntime-genai is not installed: pip install 'phiedge[onnx]'") from None
    return og


@register
class ONNXRuntime(Runtime):
    format = "onnx"
    package = "onnxruntime_genai"

    def __init__(self, path: Path, settings: RuntimeSettings):
        from .. import chat
        og = _import_og()
        self.og, self.path, self.settings = og, path, settings
        self.genai_config = json.loads((path / "genai_config.json").read_text())
        device = str(settings.extra.get("execution_provider") or settings.device or "CPU")
        provider = self._provider(og, device)
        config = og.Config(str(path))
        config.clear_providers()
        if provider is not None:
            config.append_provider(provider)
        if settings.threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": int(settings.threads)}}}}))
        try:
            self.model = og.Model(config)
        except Exception as e:      # og raises plain RuntimeError for a bad graph or provider
            raise ToolchainError(f"onnxruntime-genai could not load {path} on {device}: {e}") from None
        self.device = device
        self.tokenizer = og.Tokenizer(self.model)
        self.chat_template, self.specials = chat.load_template(path)
        self.context_length = int(self.genai_config["model"].get("context_length") or 0) or None
        self.adds_bos = bool(self.tokenize("")) if self.specials.get("bos_token") else False

    @staticmethod
    def _provider(og, device: str) -> str | None:
        key = device.upper()
        if key not in PROVIDERS:
            raise UsageError(f"onnx runtime has no device '{device}': known are {', '.join(PROVIDERS)}")
        provider, check = PROVIDERS[key]
        if check is not None and not getattr(og, check)():
            raise ToolchainError(f"this onnxruntime-genai build has no {provider} support for device '{device}': "
                                 f"install the onnxruntime-genai package for it, or use device CPU")
        return provider

    @classmethod
    def load(cls, artifact_dir: Path, settings: RuntimeSettings | None = None) -> "ONNXRuntime":
        path = Path(artifact_dir)
        if not (path / "genai_config.json").is_file():
            raise ToolchainError(f"no genai_config.json in {path}: not an onnxruntime-genai artifact; rebuild it")
        return cls(path, settings or RuntimeSettings())

    # -- one fresh generator per call: no state leaks between probes
    def _generator(self, max_length: int):
        self.check_length(max_length)
        params = self.og.GeneratorParams(self.model)
        # max_length sizes the KV cache (shared past/present buffer): never the config's 131072.
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def logits(self, ids: list[int], last_n: int, start: int = 0) -> np.ndarray:
        self._check_start(start)          # the generator numbers positions itself, and switches on the mask width
        gen = self._generator(len(ids))
        gen.append_tokens(np.asarray(ids, dtype=np.int32))        # one prefill of every id
        out = np.asarray(gen.get_output("logits"))
        out = out.reshape(-1, out.shape[-1])
        if out.shape[0] != len(ids):
            raise ToolchainError(f"onnxruntime-genai returned logits for {out.shape[0]} of {len(ids)} positions "
                                 f"(a pruned LM head or chunked prefill): rebuild the artifact with phiedge")
        return out[-last_n:].astype(np.float32)

    # -- step-wise generation (the loop is the base class's): onnxruntime-genai picks greedily itself
    def _start(self, ids: list[int], total: int) -> int:
        self._gen = self._generator(total)
        self._gen.append_tokens(np.asarray(ids, dtype=np.int32))
        return self._next()

    def _advance(self, token: int) -> int:
        return self._next()           # the generator already holds the token it picked

    def _next(self) -> int:
        self._gen.generate_next_token()                              # greedy: do_sample=False
        return int(self._gen.get_next_tokens()[0])

    def _exhausted(self) -> bool:
        """The config's own eos ids end the search even when the caller wants them."""
        return self._gen.is_done()

    # -- tokenizer and template: the artifact's own, as on a device
    def tokenize(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(np.asarray(ids, dtype=np.int32)) if ids else ""

    def stop_ids(self) -> set[int]:
        return self._stop_ids(self.genai_config["model"].get("eos_token_id"))

    def close(self) -> None:
        self.tokenizer = None
        self.model = None
