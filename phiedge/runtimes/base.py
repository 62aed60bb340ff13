"""The runtime contract, written once. A runtime module subclasses `Runtime` and registers it by format.

    rt = get(fmt).load(artifact_dir, settings)
    rt.logits(token_ids, last_n, start=0)         -> np.ndarray [last_n, vocab]   (one prefill, fresh state,
                                                     token_ids at positions start..: POSITION_SPANS)
    rt.generate_ids(token_ids, max_new_tokens, stop_ids, *, adapter=None, constraint=None) -> Generation
    rt.generate(messages, max_new_tokens)         -> Generation (the artifact's chat template and tokenizer)
    rt.tokenize(text) / rt.detokenize(ids) / rt.stop_ids()
    rt.device, rt.fallback_from                   the device used, and the profile's device when it fell back

Generation: a runtime that steps token by token supplies two primitives and inherits the loop, the length
check, stop handling, streaming and timing:

    _start(ids, total) -> int     prefill `ids` into fresh state sized for `total` tokens; the next token
    _advance(token) -> int        feed one token; the next token

Each primitive picks the token itself, on the runtime's own arrays (no copy of the vocabulary-wide logits
to numpy per step when greedy); `_pick(logits)` is the one place that choice is made for runtimes that hold
numpy-like logits: greedy, or phiedge's one sampler (Sampling: temperature, top_p, seed). A runtime whose own
engine picks (onnxruntime-genai's search, OpenVINO's LLMPipeline) reads `self._sampling` into its own sampler
with its seed. A runtime that generates through its own pipeline overrides `_stream` instead. `tokens(...)`
streams the ids as they are picked (a TokenStream: iterate it, then read .generation()); `generate_ids` is
that stream consumed. `adapter` (a LoRA chosen per call) and `constraint` (a grammar) are part of the
contract; a runtime that does not support them refuses them (SUPPORTS).
Device-path code: runtime modules import their runtime package lazily, never torch or transformers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np

from .. import chat
from ..errors import ToolchainError, UsageError
from . import guidance


@dataclass
class Generation:
    ids: list[int]
    text: str
    prompt_tokens: int
    ttft_s: float               # time to first token (prefill + first pick)
    decode_tps: float           # tokens/s after the first
    stopped: bool = False       # hit a stop token


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0 (the default), else sampled from the softmax at
    `temperature` within the smallest set of tokens whose probability reaches `top_p`. The same seed, artifact
    and prompt give the same tokens."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UsageError(f"temperature must be 0 (greedy) or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], not {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def runtime_seed(self) -> int | None:
        """The seed as every runtime takes it (a non-negative 31-bit int), None for a fresh one each time."""
        return None if self.seed is None else int(self.seed) % 2**31


GREEDY = Sampling()


class Sampler:
    """phiedge's one sampler, for the runtimes where phiedge picks the token (Runtime._pick): numpy, one generator
    seeded per answer."""

    def __init__(self, sampling: Sampling):
        self.temperature, self.top_p = sampling.temperature, sampling.top_p
        self.rng = np.random.default_rng(sampling.runtime_seed)

    def __call__(self, logits) -> int:
        x = np.asarray(logits, dtype=np.float64) / self.temperature
        p = np.exp(x - x.max())
        if self.top_p < 1:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.top_p * cum[-1])) + 1]
            cum = np.cumsum(p[keep])
            return int(keep[min(int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right")), len(keep) - 1)])
        cum = np.cumsum(p)
        return int(min(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"), len(p) - 1))


@dataclass(frozen=True)
class RuntimeSettings:
    threads: int = 2
    n_ctx: int | None = None     # None: chosen per call by prompt length (see each runtime)
    device: str = "CPU"
    extra: dict = field(default_factory=dict)


class Runtime:
    format: ClassVar[str]
    package: ClassVar[str]             # the Python package a device needs, for `validate` and error messages
    SUPPORTS: ClassVar[frozenset[str]] = frozenset()     # of "adapter", "constraint"
    # The JSON schema (a dict) the generation in progress is held to (generate_ids' `constraint`): each runtime
    # applies it with its own mechanism; None outside generate_ids.
    _constraint: dict | None = None
    _grammar: str | None = None         # its llguidance grammar (check_schema), compiled once per generation
    _guide = None                       # its llguidance matcher, for runtimes that pick tokens themselves (_choose)
    _llg = None                         # llguidance's tokenizer, made on the first constrained generation
    _sampling: Sampling = GREEDY        # the generation in progress's (tokens' `sampling`)
    _sampler: Sampler | None = None     # phiedge's sampler for it, None when greedy
    path: Path
    _until_max = False                  # no stop ids given: generate max_new_tokens, the model's own eos included
    # Whether a prefill hands back fp32 logits for every position (the LM head over all of them) or only for
    # the rows asked for: at a 200,064 vocabulary a 4200-token probe's are 3.4 GB.
    ALL_ROW_LOGITS: ClassVar[bool] = True
    # Whether `logits` can prefill ids at positions start.. on fresh state (start > 0): the long probe's span
    # (phiedge.checks.probes.span) then measures the long LongRoPE regime without the whole long prompt.
    POSITION_SPANS: ClassVar[bool] = False
    # Whether prompt logits come from an engine of their own beside the one that generates (each holding the
    # weights): a check then scores everything first and calls `release_scoring` before generating
    # (phiedge.checks.measure), so the two are never loaded together.
    SCORES_APART: ClassVar[bool] = False
    settings: RuntimeSettings
    chat_template: str | None = None   # the artifact's own template and special tokens
    specials: dict = {}
    _adapter_template: tuple[str, dict] | None = None   # an applied adapter's own (use_adapter), which wins
    adds_bos: bool = False             # the runtime's tokenizer prepends BOS itself
    device: str = "CPU"                # the device this runtime runs on
    fallback_from: str | None = None   # the profile's device, when it was absent and `device` is its fallback
    context_length: int | None = None  # the model's own context limit, when the artifact states one

    @classmethod
    def check_peak_bytes(cls, artifact_bytes: int, n_vocab: int, probe_tokens: int) -> int:
        """Estimated peak memory of checking an artifact of this size on this runtime (phiedge.build.stage_peaks):
        its weights as loaded (+20 % for the runtime's own buffers, activations and KV cache), the longest
        probe's logits, and the worker process."""
        logits = n_vocab * probe_tokens * 4 if cls.ALL_ROW_LOGITS else 0
        return int(1.2 * artifact_bytes) + logits + 400 * 2**20

    @classmethod
    def exact_settings(cls, meta: dict) -> dict | None:
        """RuntimeSettings.extra that run an artifact with `meta` exactly, when the settings it ships with trade
        exactness for speed (OpenVINO's own CPU defaults for int8/int4); None when it already runs exactly. An
        artifact that fails its check with what it ships is checked again with these, and ships with them when
        it passes so (phiedge.worker.measure_files / result_of)."""
        return None

    @classmethod
    def check_schema(cls, schema: dict) -> str:
        """Refuse, before any model loads, a JSON schema this runtime's constraint cannot hold whole: one line
        naming the keyword (phiedge.runtimes.guidance); its llguidance grammar otherwise. Generation checks it
        again, so no caller can skip it."""
        if "constraint" not in cls.SUPPORTS:
            raise UsageError(f"the {cls.format} runtime cannot constrain answers to a JSON schema yet")
        return guidance.compile_schema(schema, cls.format)

    @classmethod
    def load(cls, artifact_dir: Path, settings: RuntimeSettings | None = None) -> "Runtime":
        raise NotImplementedError

    # -- what every runtime supplies
    def logits(self, ids: list[int], last_n: int, start: int = 0) -> np.ndarray:
        raise NotImplementedError

    def release_scoring(self) -> None:
        """Let the scoring engine go (SCORES_APART); a later `logits` call makes it again."""

    def use_adapter(self, adapter_dir: Path | None) -> None:
        """Apply a LoRA kept separate (its runtime file, phiedge.exporters Exporter.export_adapter) from the next
        evaluation on, or none: in place, the base stays loaded. Loading with RuntimeSettings.extra["adapter"]
        applies one from the start. An adapter folder that holds its own chat template (phiedge.tokenizer_files)
        prompts with it while it is applied (chat_ids)."""
        self._use_adapter(adapter_dir)
        own = adapter_dir is not None and any((Path(adapter_dir) / f).is_file() for f in chat.TEMPLATE_FILES)
        self._adapter_template = chat.load_template(Path(adapter_dir)) if own else None

    def _use_adapter(self, adapter_dir: Path | None) -> None:
        """The runtime's own switch of adapter (use_adapter)."""
        raise UsageError(f"the {self.format} runtime cannot apply an adapter kept separate yet: build the bundle "
                         f"with --adapter-mode merged")

    def _check_start(self, start: int) -> None:
        if start and not self.POSITION_SPANS:
            raise UsageError(f"the {self.format} runtime prefills whole prompts only (start {start} asked)")

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids: list[int]) -> str:
        raise NotImplementedError

    def stop_ids(self) -> set[int]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # -- step-wise generation: two primitives (see the module docstring)
    def _start(self, ids: list[int], total: int) -> int:
        raise NotImplementedError(f"{type(self).__name__} generates through _stream")

    def _advance(self, token: int) -> int:
        raise NotImplementedError

    def _exhausted(self) -> bool:
        """The runtime's own search ended (e.g. onnxruntime-genai's max length or eos)."""
        return False

    def _pick(self, logits) -> int:
        """The runtime's next token from one position's logits (numpy, or a runtime array with argmax): greedy, or
        phiedge's sampler when the generation samples."""
        return int(logits.argmax()) if self._sampler is None else self._sampler(logits)

    def _choose(self, logits: np.ndarray) -> int:
        """The next token from one position's numpy logits, held to the constraint when one is set: llguidance's
        mask over the runtime's own vocabulary (phiedge.runtimes.guidance), then `_pick`."""
        if self._constraint is None:
            return self._pick(logits)
        if self._guide is None:
            self._guide = guidance.Guide(self._llg_tokenizer(logits.shape[-1]), self._grammar, self.format)
        token = self._pick(self._guide.mask(logits))
        self._guide.consume(token)
        return token

    def _llg_tokenizer(self, n_vocab: int):
        """llguidance's view of this artifact's vocabulary, every stop id an end of the answer (made once): its
        tokenizer.json, rows past it (a padded vocabulary) never allowed."""
        if self._llg is None:
            self._llg = guidance.tokenizer(self.path / "tokenizer.json", n_vocab, sorted(self.stop_ids()), self.format)
        return self._llg

    # -- written once
    def check_length(self, n_tokens: int) -> None:
        """A device profile's context size (settings.extra['max_ctx']) and the model's own bound what may run."""
        cap = self.settings.extra.get("max_ctx")
        if cap and n_tokens > cap:
            raise UsageError(f"prompt and answer need {n_tokens} tokens, the target's context is {cap}: "
                             f"ask a shorter question, retrieve fewer chunks (-k), or lower --max-tokens")
        if self.context_length and n_tokens > self.context_length:
            raise UsageError(f"prompt and answer need {n_tokens} tokens, the model's context is "
                             f"{self.context_length}: shorten the prompt")

    def generate_ids(self, ids: list[int], max_new_tokens: int, stop_ids: set[int] | None = None, *,
                     adapter: str | None = None, constraint=None, sampling: Sampling | None = None) -> Generation:
        stream = self.tokens(ids, max_new_tokens, stop_ids, adapter=adapter, constraint=constraint, sampling=sampling)
        for _ in stream:
            pass
        return stream.generation()

    def tokens(self, ids: list[int], max_new_tokens: int, stop_ids: set[int] | None = None, *,
               adapter: str | None = None, constraint=None, sampling: Sampling | None = None) -> "TokenStream":
        """The answer's token ids as they are picked (stop token excluded): a TokenStream to iterate, then read
        .generation(). Closing it early ends the generation. One at a time per runtime."""
        for what, value in (("adapter", adapter), ("constraint", constraint)):
            if value is not None and what not in self.SUPPORTS:
                raise UsageError(f"the {self.format} runtime does not take a per-call {what} yet")
        grammar = self.check_schema(constraint) if constraint is not None else None
        stop = self.stop_ids() if stop_ids is None else set(stop_ids)
        self.check_length(len(ids) + max_new_tokens)
        return TokenStream(self, list(ids), max_new_tokens, stop, constraint, grammar, sampling or GREEDY)

    def _stream(self, ids: list[int], max_new_tokens: int, stop: set[int]) -> Iterator[int]:
        """The loop over `_start` / `_advance`: every token picked, the stop token that ends it included; it ends
        at a stop token, at max_new_tokens, or when the runtime's own search ends (_exhausted)."""
        tok = self._start(ids, len(ids) + max_new_tokens)
        n = 0
        while True:
            yield tok
            n += 1
            if tok in stop or n >= max_new_tokens or self._exhausted():
                return
            tok = self._advance(tok)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The chat prompt through the artifact's own template and tokenizer, as on a device."""
        template, specials = self._adapter_template or (self.chat_template, self.specials)
        if not template:
            raise ToolchainError(f"this {self.format} artifact has no chat template: rebuild it from a model with one")
        text = chat.render(template, messages, specials)
        bos = specials.get("bos_token") or ""
        if self.adds_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return self.tokenize(text)

    def generate(self, messages: list[dict], max_new_tokens: int = 128, **options) -> Generation:
        return self.generate_ids(self.chat_ids(messages), max_new_tokens, self.stop_ids(), **options)

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


class TokenStream:
    """One generation's token ids as the runtime picks them (Runtime.tokens): iterate it; `generation()` after."""

    def __init__(self, runtime: Runtime, ids: list[int], max_new_tokens: int, stop: set[int], constraint, grammar,
                 sampling: Sampling):
        self.runtime, self.prompt_tokens, self.ids, self.stopped = runtime, len(ids), [], False
        self._t0 = self._t_first = self._end = None
        self._it = self._run(ids, max_new_tokens, stop, constraint, grammar, sampling)

    def __iter__(self) -> Iterator[int]:
        return self._it

    def close(self) -> None:
        """End the generation here (the runtime is free for the next one)."""
        self._it.close()

    def _run(self, ids, max_new_tokens, stop, constraint, grammar, sampling) -> Iterator[int]:
        rt = self.runtime
        self._t0 = time.perf_counter()
        rt._constraint, rt._grammar, rt._until_max, rt._guide = constraint, grammar, not stop, None
        rt._sampling, rt._sampler = sampling, None if sampling.greedy else Sampler(sampling)
        picked = rt._stream(ids, max_new_tokens, stop)
        try:
            for tok in picked:
                if self._t_first is None:
                    self._t_first = time.perf_counter()
                if tok in stop:
                    self.stopped = True
                    return
                self.ids.append(tok)
                yield tok
                if len(self.ids) >= max_new_tokens:
                    return
            self.stopped = True                 # the runtime's own search ended before max_new_tokens
        finally:
            picked.close()
            self._end = time.perf_counter()
            rt._constraint, rt._grammar, rt._until_max, rt._guide = None, None, False, None
            rt._sampling, rt._sampler = GREEDY, None

    def generation(self) -> Generation:
        end = self._end or time.perf_counter()
        t0, first, out = self._t0 or end, self._t_first, self.ids
        tps = (len(out) - 1) / (end - first) if first and len(out) > 1 and end > first else 0.0
        return Generation(ids=list(out), text=self.runtime.detokenize(out), prompt_tokens=self.prompt_tokens,
                          ttft_s=(first or end) - t0, decode_tps=tps, stopped=self.stopped)


REGISTRY: dict[str, type[Runtime]] = {}


def register(cls: type[Runtime]) -> type[Runtime]:
    REGISTRY[cls.format] = cls
    return cls


def get(fmt: str) -> type[Runtime]:
    if fmt not in REGISTRY:
        raise UsageError(f"no runtime for format '{fmt}': known are {', '.join(sorted(REGISTRY))}")
    return REGISTRY[fmt]
