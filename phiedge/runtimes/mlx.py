"""mlx-lm: the artifact's model through `mlx_lm.utils.load_model`, with a LongRoPE that does what PyTorch does.

LongRoPE (Phi-3 / Phi-4-mini): Hugging Face picks the factor set per forward call from the total length it
sees (max position + 1): long factors iff it exceeds original_max_position_embeddings, and scales cos/sin by
the attention factor sqrt(1 + ln(s) / ln(orig)) in both regimes. mlx-lm does neither reliably:
0.31.3 and 0.32.x build `SuScaledRoPE` from the long factors only (short prompts run with the long factors),
0.29.1 switches per call but `generate` prefills in 2048-token chunks, so a prompt crossing the switch mixes
the two sets. This runtime therefore (1) swaps every phi3 attention's rope for `LongRoPE` below, which
applies Hugging Face's rule on each call's `offset + length`, and (2) prefills the whole prompt in ONE call,
in `logits` and in `generate_ids`. Decode steps then follow the same rule one token at a time, and an answer
that grows past the switch is prefilled again whole in the long regime, as transformers' Phi-3 re-computes its
cache there. tests/test_mlx.py shows the gate failing both the stock rope and a chunked prefill.

Tokenizer and chat template: the artifact's own tokenizer.json (the `tokenizers` library) and
chat_template.jinja rendered by phiedge.chat, as on every runtime. Device-path module: mlx, mlx-lm (which
imports transformers for its own tokenizer code), numpy, tokenizers, jinja2; never torch.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from ..errors import ToolchainError, UsageError
from .base import Runtime, RuntimeSettings, register

log = logging.getLogger(__name__)

LONGROPE_TYPES = ("longrope", "su")
DEVICES = ("CPU", "GPU")
# mlx-lm architectures whose Model.__call__ is `model.model(x)` then the LM head (tied: embed_tokens.as_linear)
# and nothing else, so `logits` can run the head on the compared rows only (a 4200-token probe's logits are
# 3.4 GB at Phi-4-mini's vocabulary). Others run the whole call.
HEAD_AFTER_MODEL = ("phi3", "llama")


def _import_mlx():
    try:
        import mlx.core as mx
        import mlx.nn as nn
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model
    except ImportError as e:
        raise ToolchainError(f"mlx-lm is not usable ({e}): pip install 'phiedge[mlx]' "
                             f"(on Linux mlx[cpu], not mlx-cpu alone)") from None
    return mx, nn, load_model, make_prompt_cache


def longrope_params(config: dict) -> dict | None:
    """Hugging Face's LongRoPE parameters from a phi3 config, or None if it has no LongRoPE."""
    rs = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if str(rs.get("type") or rs.get("rope_type") or "").lower() not in LONGROPE_TYPES:
        return None
    orig = int(config.get("original_max_position_embeddings") or rs["original_max_position_embeddings"])
    factor = rs.get("factor") or config["max_position_embeddings"] / orig
    attention = rs.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return {"original_max_position_embeddings": orig, "short_factor": rs["short_factor"],
            "long_factor": rs["long_factor"], "attention_factor": float(attention),
            "base": float(config.get("rope_theta") or rs.get("rope_theta") or 10000.0)}


def make_longrope(nn, mx):
    class LongRoPE(nn.Module):
        """Both factor sets; each call uses the long one iff offset + length > original_max_position_embeddings."""

        def __init__(self, dims: int, params: dict):
            super().__init__()
            self.dims, self.switch = dims, params["original_max_position_embeddings"]
            base = params["base"] ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
            self._short = mx.array(params["short_factor"], dtype=mx.float32) * base
            self._long = mx.array(params["long_factor"], dtype=mx.float32) * base
            self._scale = params["attention_factor"]
            self.calls = {"short": 0, "long": 0}
            self.shift = 0            # added to every position: a span prefilled at its own positions (logits)

        def __call__(self, x, offset=0):
            offset = offset + self.shift
            long = int(offset) + x.shape[-2] > self.switch
            self.calls["long" if long else "short"] += 1
            x = x[...]
            x[..., : self.dims] = self._scale * x[..., : self.dims]
            return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset,
                                freqs=self._long if long else self._short)

    return LongRoPE


def patch_longrope(model, config: dict) -> int:
    """Swap in LongRoPE on a phi3 model with LongRoPE; the number of layers patched."""
    params = longrope_params(config)
    if config.get("model_type") != "phi3" or params is None:
        return 0
    mx, nn, _, _ = _import_mlx()
    cls = make_longrope(nn, mx)
    for layer in model.layers:
        layer.self_attn.rope = cls(layer.self_attn.rope.dim, params)
    return len(model.layers)


@register
class MLXRuntime(Runtime):
    format = "mlx"
    SUPPORTS = frozenset({"constraint"})
    package = "mlx_lm"
    ALL_ROW_LOGITS = False            # HEAD_AFTER_MODEL: Phi-4-mini's and SmolLM2's heads run on the compared rows
    POSITION_SPANS = True             # LongRoPE.shift (the only rope with a long regime to measure)

    def __init__(self, path: Path, settings: RuntimeSettings, fix_longrope: bool = True):
        from tokenizers import Tokenizer

        from .. import chat
        mx, _, load_model, make_prompt_cache = _import_mlx()
        self.mx, self.make_prompt_cache, self.path, self.settings = mx, make_prompt_cache, path, settings
        device = str(settings.device or "CPU").upper()
        if device not in DEVICES:
            raise UsageError(f"mlx runtime has no device '{device}': known are {', '.join(DEVICES)}")
        if device == "GPU" and not mx.is_available(mx.gpu):
            raise ToolchainError("this mlx build has no GPU (Metal) backend: use device CPU")
        mx.set_default_device(mx.gpu if device == "GPU" else mx.cpu)
        self.device = device
        try:
            self.model, self.config = load_model(path)
        except (ValueError, FileNotFoundError) as e:
            raise ToolchainError(f"mlx-lm could not load {path}: {e}") from None
        self.patched_layers = patch_longrope(self.model, self.config) if fix_longrope else 0
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.chat_template, self.specials = chat.load_template(path)
        if settings.extra.get("adapter"):
            self.use_adapter(Path(settings.extra["adapter"]))

    def _use_adapter(self, adapter_dir: Path | None) -> None:
        """Apply the mlx-lm adapter in `adapter_dir` (phiedge.exporters.mlx.ADAPTER_FILES) from the next evaluation
        on, or none: in place, the base's layers stay loaded. mlx-lm's own `load_adapters` wraps them (LoRALinear /
        DoRALinear, as `mlx_lm.load(..., adapter_path=)` does); a switch unwraps them first. mlx-lm loads adapter
        weights with strict=False, which drops misnamed keys without a word: every key must land here."""
        from mlx.utils import tree_flatten, tree_unflatten
        from mlx_lm.tuner.dora import DoRALinear
        from mlx_lm.tuner.lora import LoRALinear
        from mlx_lm.tuner.utils import load_adapters
        wrapped = [(n, m.linear) for n, m in self.model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))]
        if wrapped:
            self.model.update_modules(tree_unflatten(wrapped))
        if adapter_dir is None:
            return
        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapters.safetensors").is_file() or not (adapter_dir / "adapter_config.json").is_file():
            raise ToolchainError(f"no adapters.safetensors + adapter_config.json in {adapter_dir}: rebuild the "
                                 f"bundle's adapters")
        try:
            load_adapters(self.model, str(adapter_dir))
        except (ValueError, KeyError) as e:
            raise ToolchainError(f"mlx-lm could not apply the adapter {adapter_dir} to this base ({e}): rebuild it "
                                 f"from this bundle's base") from None
        have = {k: v.shape for k, v in tree_flatten(self.model.parameters())}
        missed = [k for k, v in self.mx.load(str(adapter_dir / "adapters.safetensors")).items()
                  if have.get(k) != v.shape]
        if missed:
            self.use_adapter(None)
            raise ToolchainError(f"the adapter {adapter_dir} does not fit this base ({missed[0]} has no place in the "
                                 f"model): rebuild it from this bundle's base")

    @classmethod
    def load(cls, artifact_dir: Path, settings: RuntimeSettings | None = None) -> "MLXRuntime":
        path = Path(artifact_dir)
        if not (path / "config.json").is_file() or not list(path.glob("model*.safetensors")):
            raise ToolchainError(f"no config.json + model*.safetensors in {path}: not an MLX artifact; rebuild it")
        return cls(path, settings or RuntimeSettings())

    def logits(self, ids: list[int], last_n: int, start: int = 0) -> np.ndarray:
        """One prefill of every id, no cache, at positions start.. (LongRoPE's shift: a span only on a model
        this runtime patched); only the last `last_n` rows go through the LM head where the model's head is
        one this runtime knows (HEAD_AFTER_MODEL)."""
        self.check_length(start + len(ids))
        if start and not self.patched_layers:
            raise UsageError(f"mlx prefills a span at position {start} only on a LongRoPE model")
        x = self.mx.array([ids])
        self._shift(start)
        try:
            if self.config.get("model_type") in HEAD_AFTER_MODEL:
                hidden = self.model.model(x)[:, -last_n:]
                head = self.model.model.embed_tokens.as_linear if self.model.args.tie_word_embeddings \
                    else self.model.lm_head
                out = head(hidden)[0]
            else:
                out = self.model(x)[0, -last_n:]
            return np.array(out.astype(self.mx.float32))
        finally:
            self._shift(0)

    def _shift(self, start: int) -> None:
        for layer in self.model.layers[: self.patched_layers]:
            layer.self_attn.rope.shift = start

    # -- step-wise generation (the loop is the base class's): the whole prompt in one call, then one token a call
    def _start(self, ids: list[int], total: int) -> int:
        self._cache = self.make_prompt_cache(self.model)
        self._gen_ids = list(ids)
        return self._step(ids)

    def _advance(self, token: int) -> int:
        self._gen_ids.append(token)
        if self.patched_layers and len(self._gen_ids) == self.model.layers[0].self_attn.rope.switch + 1:
            # The answer crosses the LongRoPE switch: everything so far again on a fresh cache, in the long regime,
            # as transformers' Phi-3 re-computes its cache there (prepare_inputs_for_generation) and as a prompt
            # past the switch runs; the keys cached in the short regime are not kept.
            self._cache = self.make_prompt_cache(self.model)
            return self._step(self._gen_ids)
        return self._step([token])

    def _step(self, ids: list[int]) -> int:
        logits = self.model(self.mx.array([ids]), cache=self._cache)[0, -1]
        if self._constraint is None and self._sampler is None:
            return int(self.mx.argmax(logits).item())      # greedy, picked by mlx: no vocabulary-wide copy to numpy
        return self._choose(np.array(logits.astype(self.mx.float32)))   # a constraint or phiedge's sampler

    # -- tokenizer and template: the artifact's own, as on a device
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def stop_ids(self) -> set[int]:
        return self._stop_ids(self.config.get("eos_token_id"), self._generation_config().get("eos_token_id"))

    def _generation_config(self) -> dict:
        f = self.path / "generation_config.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
