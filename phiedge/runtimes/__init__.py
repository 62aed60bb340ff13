"""Runtimes, one module per format, found through a registry. A runtime is three calls:

    rt = get(fmt).load(artifact_dir, settings)
    rt.logits(token_ids, last_n)        -> np.ndarray [last_n, vocab]   (one prefill, fresh state)
    rt.generate_ids(token_ids, max_new_tokens, stop_ids) -> Generation
    rt.generate(messages, max_new_tokens) -> Generation (chat template + tokenizer of the artifact)

Parity and smoke are written once against this contract. Device-path code: runtime modules import their
runtime package lazily, never torch or transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import ToolchainError, UsageError


@dataclass
class Generation:
    ids: list[int]
    text: str
    prompt_tokens: int
    ttft_s: float               # time to first token (prefill + first sample)
    decode_tps: float           # tokens/s after the first
    stopped: bool = False       # hit a stop token


@dataclass(frozen=True)
class RuntimeSettings:
    threads: int = 2
    n_ctx: int | None = None     # None: chosen per call by prompt length (see each runtime)
    device: str = "CPU"
    extra: dict = field(default_factory=dict)


class Runtime:
    format: ClassVar[str]
    package: ClassVar[str]       # the Python package a device needs, for `validate` and error messages
    settings: RuntimeSettings
    chat_template: str | None = None   # the artifact's own template and special tokens
    specials: dict = {}
    adds_bos: bool = False             # the runtime's tokenizer prepends BOS itself

    @classmethod
    def load(cls, artifact_dir: Path, settings: RuntimeSettings | None = None) -> "Runtime":
        raise NotImplementedError

    def logits(self, ids: list[int], last_n: int) -> np.ndarray:
        raise NotImplementedError

    def generate_ids(self, ids: list[int], max_new_tokens: int, stop_ids: set[int] | None = None) -> Generation:
        raise NotImplementedError

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The chat prompt through the artifact's own template and tokenizer, as on a device."""
        from .. import chat
        if not self.chat_template:
            raise ToolchainError(f"this {self.format} artifact has no chat template: rebuild it from a model with one")
        text = chat.render(self.chat_template, messages, self.specials)
        bos = self.specials.get("bos_token") or ""
        if self.adds_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return self.tokenize(text)

    def check_fits(self, n_tokens: int) -> None:
        """A device profile's context size (settings.extra['max_ctx']) bounds what `ask` may send."""
        cap = self.settings.extra.get("max_ctx")
        if cap and n_tokens > cap:
            raise UsageError(f"prompt and answer need {n_tokens} tokens, the target's context is {cap}: "
                             f"ask a shorter question, retrieve fewer chunks (-k), or lower --max-tokens")

    def stop_ids(self) -> set[int]:
        raise NotImplementedError

    def _stop_ids(self, *eos_values) -> set[int]:
        """Configured eos ids (int or list each) plus every end-of-turn token the vocabulary has."""
        from ..chat import END_TOKENS
        ids: set = set()
        for v in eos_values:
            ids |= set(v if isinstance(v, list) else [v] if v is not None else [])
        for t in END_TOKENS:
            enc = self.tokenize(t)
            if len(enc) == 1:
                ids.add(enc[0])
        return {int(i) for i in ids if i is not None and int(i) >= 0}

    def generate(self, messages: list[dict], max_new_tokens: int = 128) -> Generation:
        return self.generate_ids(self.chat_ids(messages), max_new_tokens, self.stop_ids())

    def close(self) -> None:
        pass


REGISTRY: dict[str, type[Runtime]] = {}


def register(cls: type[Runtime]) -> type[Runtime]:
    REGISTRY[cls.format] = cls
    return cls


def get(fmt: str) -> type[Runtime]:
    if fmt not in REGISTRY:
        raise UsageError(f"no runtime for format '{fmt}': known are {', '.join(sorted(REGISTRY))}")
    return REGISTRY[fmt]


def timed_decode(first_token_at: float, start: float, n: int, end: float) -> tuple[float, float]:
    """(ttft, decode tokens/s) from wall-clock marks."""
    ttft = first_token_at - start
    tps = (n - 1) / (end - first_token_at) if n > 1 and end > first_token_at else 0.0
    return ttft, tps


from . import gguf  # noqa: E402,F401  (registers itself)
from . import onnx  # noqa: E402,F401  (registers itself)
from . import openvino  # noqa: E402,F401  (registers itself)
from . import mlx  # noqa: E402,F401  (registers itself)
