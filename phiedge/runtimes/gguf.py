"""llama.cpp through llama-cpp-python's low-level wrappers (one model load, one context per regime).

LongRoPE trap: llama.cpp picks the short or long factor set from the *context size* (n_ctx > the
training context `rope.scaling.original_context_length` means long factors), while Hugging Face picks it
from the sequence length. So the context is sized from the sequence: at most the original length while
the sequence fits in it, larger only when the sequence itself is past it. Then both agree in both regimes.
An answer (or a conversation's next turn) that grows past the switch gets a context sized for it, re-prefilled
with everything so far: the long factors from then on, as a prompt past the switch runs them (_advance).
"""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ToolchainError, UsageError
from ..pages import drop_mapped_pages
from . import guidance
from .base import Runtime, RuntimeSettings, register

log = logging.getLogger(__name__)
N_BATCH = 512
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}     # ggml_type ids
# Flash attention: off unless a profile turns it on. llama.cpp's context default is AUTO, which enables it on the
# CPU backend, where its decode is slower (`Llama()` defaults to off). Measured at full size (3.8 B, Q4_K_M, 2
# threads, 32 tokens after 512, best of 2): phiedge off 4.36 / on 4.01 tok/s, llama.cpp's own loop off 4.40 / on
# 3.96 -- with it off phiedge reads 0.99x the best native (it read 0.88x with AUTO).
FLASH_ATTN = False


def _cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@register
class GGUFRuntime(Runtime):
    format = "gguf"
    SUPPORTS = frozenset({"constraint"})
    package = "llama_cpp"
    ALL_ROW_LOGITS = False          # llama.cpp computes logits only for the batch rows flagged for them
    POSITION_SPANS = True           # a batch states each token's position

    @classmethod
    def check_peak_bytes(cls, artifact_bytes: int, n_vocab: int, probe_tokens: int) -> int:
        """Measured at full size (3.84 B, Q4_K_M: 2.49 GB, 2.38 GB by the estimate this is given; 4200-token
        probe; PSS of the build's process tree): 5.51 GB on an AMX Xeon, where the weights are used from the
        mapped file; 7.12 GiB on an AMD EPYC, where the CPU backend repacks them into a copy of its own and the
        mapped pages it read them from stayed resident (they are let go after the load since: 4.76 -> 3.39 GB
        after a 512-token prefill, so this is high there until the bench measures it again). Plus the f16 KV
        cache and a 512-row batch's logits."""
        return int(2.8 * artifact_bytes) + 400 * 2**20

    def __init__(self, path: Path, settings: RuntimeSettings):
        try:
            import llama_cpp
            from llama_cpp import _internals
        except ImportError:
            raise ToolchainError("llama-cpp-python is not installed: pip install 'phiedge[gguf]'") from None
        from llama_cpp import _logger
        _logger.set_verbose(bool(os.environ.get("PHIEDGE_DEBUG")))   # llama.cpp's own log: debug only
        self._lc, self._int = llama_cpp, _internals
        self.settings = settings
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        # Weight repacking (extra buffer types) died with SIGILL in llama_decode on the AMX Xeon VM make bench ran on:
        # off there only,
        # unless the profile says otherwise.
        mp.use_extra_bufts = bool(settings.extra.get("use_extra_bufts", not _cpu_has_amx()))
        self.model = _internals.LlamaModel(path_model=str(path), params=mp, verbose=bool(os.environ.get("PHIEDGE_DEBUG")))
        if mp.use_extra_bufts:
            # The CPU backend repacked most weights into buffers of its own, reading them from the mapped file,
            # whose pages stay resident beside the copy: let them go (the weights it still uses from the file fault
            # back in). Full size, Q4_K_M, after a 512-token prefill: 4.76 -> 3.39 GB PSS, the same logits.
            drop_mapped_pages(os.path.realpath(path))
        meta = self.model.metadata()
        arch = meta.get("general.architecture", "")
        self.orig_ctx = int(meta.get(f"{arch}.rope.scaling.original_context_length", 0)) or None
        self.train_ctx = self.model.n_ctx_train()
        self.chat_template = meta.get("tokenizer.chat_template")
        m = self.model
        self.specials = {"bos_token": m.token_get_text(m.token_bos()) if m.token_bos() >= 0 else "",
                         "eos_token": m.token_get_text(m.token_eos()) if m.token_eos() >= 0 else ""}
        self.adds_bos = m.add_bos_token()
        self.n_vocab = self.model.n_vocab()
        self._stops: frozenset[int] | None = None
        self._ctx = None
        self._ctx_size = None
        self._loras: dict[Path, object] = {}        # adapter file -> llama.cpp's adapter, loaded once per model
        self._lora = None                           # the one applied (None: the base alone)
        if settings.extra.get("adapter"):
            self.use_adapter(Path(settings.extra["adapter"]))

    @classmethod
    def load(cls, artifact_dir: Path, settings: RuntimeSettings | None = None) -> "GGUFRuntime":
        files = sorted(Path(artifact_dir).glob("*.gguf"))
        if not files:
            raise ToolchainError(f"no .gguf file in {artifact_dir}: rebuild the artifact")
        return cls(files[0], settings or RuntimeSettings())

    def _use_adapter(self, adapter_dir: Path | None) -> None:
        """Apply the LoRA file in `adapter_dir` (phiedge.exporters.gguf.ADAPTER_FILE) from the next evaluation on,
        or none (the base alone): in place, the base stays loaded and each adapter is read once."""
        if adapter_dir is None:
            self._lora = None
        else:
            files = sorted(Path(adapter_dir).glob("*.gguf"))
            if not files:
                raise ToolchainError(f"no .gguf adapter file in {adapter_dir}: rebuild the bundle's adapters")
            path = files[0].resolve()
            if path not in self._loras:
                lora = self._lc.llama_adapter_lora_init(self.model.model, str(path).encode())
                if not lora:
                    raise ToolchainError(f"llama.cpp could not load the adapter {path} on this base (another "
                                         f"architecture or shape?): rebuild it from this bundle's base")
                self._loras[path] = lora
            self._lora = self._loras[path]
        if self._ctx is not None:
            self._apply_adapter(self._ctx)

    def _apply_adapter(self, ctx) -> None:
        """Adapters are set per context: on every new one (a regime switch makes one) and on every switch."""
        if not self._loras:                         # never given one: llama.cpp's context as it comes
            return
        if self._lora is None:
            self._lc.llama_set_adapters_lora(ctx.ctx, None, 0, None)
            return
        loras = (self._lc.llama_adapter_lora_p_ctypes * 1)(self._lora)
        self._lc.llama_set_adapters_lora(ctx.ctx, loras, 1, (ctypes.c_float * 1)(1.0))  # the scale is in the file

    # -- context sizing: the heart of LongRoPE parity on llama.cpp
    def context_size(self, n_tokens: int) -> int:
        self.check_length(n_tokens)
        if self.settings.n_ctx:
            if n_tokens > self.settings.n_ctx:
                raise UsageError(f"prompt and answer need {n_tokens} tokens, the context is {self.settings.n_ctx}: "
                                 f"ask a shorter question, retrieve fewer chunks (-k), or lower --max-tokens")
            return self.settings.n_ctx
        if self.orig_ctx and n_tokens <= self.orig_ctx:
            return self.orig_ctx                                    # short factors
        need = -(-max(n_tokens, (self.orig_ctx or 0) + 1) // 256) * 256
        return min(need, self.train_ctx) if self.train_ctx else need  # long factors

    def _context(self, n_tokens: int):
        size = self.context_size(n_tokens)
        # Without LongRoPE the context's size changes nothing but room: a larger one is kept (a new one per prompt
        # length cost a server about 40 ms a request). With LongRoPE its size is the regime: exactly this one.
        roomy = not self.orig_ctx and not self.settings.n_ctx and self._ctx_size and size <= self._ctx_size
        if self._ctx is None or self._ctx_size != size and not roomy:
            cp = self._lc.llama_context_default_params()
            cp.n_ctx = size
            cp.n_batch = N_BATCH
            cp.n_ubatch = N_BATCH
            cp.n_threads = cp.n_threads_batch = self.settings.threads
            # KV cache element type: llama.cpp's default f16 is what devices run; "f32" isolates weight error.
            kv = KV_TYPES[self.settings.extra.get("kv_cache_type", "f16")]
            cp.type_k = cp.type_v = kv
            cp.flash_attn_type = 1 if self.settings.extra.get("flash_attn", FLASH_ATTN) else 0
            self._ctx = None
            self._ctx = self._int.LlamaContext(model=self.model, params=cp, verbose=False)
            self._ctx_size = size
            self._apply_adapter(self._ctx)
        else:
            self._ctx.kv_cache_clear()
        return self._ctx

    def _decode(self, ctx, batch, ids: list[int], n_past: int, want_from: int) -> Iterator[np.ndarray]:
        """Decode ids at positions n_past.., yielding a view of the logits of every position >= want_from (valid
        until the next decode: copy to keep)."""
        for start in range(0, len(ids), N_BATCH):
            chunk = ids[start:start + N_BATCH]
            b = batch.batch
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                pos = n_past + start + i
                b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = t, pos, 1, 0
                b.logits[i] = pos >= want_from
            ctx.decode(batch)
            for i in range(len(chunk)):
                if n_past + start + i >= want_from:
                    ptr = ctx.get_logits_ith(i)
                    yield np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))

    def logits(self, ids: list[int], last_n: int, start: int = 0) -> np.ndarray:
        """ids at positions start.. on an empty cache; the context is sized for start + len(ids), so a span
        past the switch runs the long factors."""
        ctx = self._context(start + len(ids))
        batch = self._int.LlamaBatch(n_tokens=N_BATCH, embd=0, n_seq_max=1, verbose=False)
        return np.stack([row.copy() for row in self._decode(ctx, batch, ids, start, start + len(ids) - last_n)])

    # -- step-wise generation (the loop is the base class's): the pick reads llama.cpp's logits in place
    def _start(self, ids: list[int], total: int) -> int:
        """The context sized for the prompt as the build's check sizes it (context_size): a prompt within the
        LongRoPE switch runs the short factors, as PyTorch's prefill of it does, even when the answer may grow past
        the switch (_advance crosses then)."""
        short = self.orig_ctx and not self.settings.n_ctx and len(ids) <= self.orig_ctx
        self._gen_ctx = self._context(len(ids) if short else total)
        self._gen_batch = self._int.LlamaBatch(n_tokens=N_BATCH, embd=0, n_seq_max=1, verbose=False)
        self._gen_ids, self._gen_total = list(ids), total
        return self._decode_pick(ids, 0)

    def _advance(self, token: int) -> int:
        self._gen_ids.append(token)
        if len(self._gen_ids) > self._ctx_size:
            # The answer crosses the switch: a context sized for the whole answer (the long factors, as the check
            # runs a prompt past the switch), re-prefilled with the prompt and the answer so far, as transformers'
            # Phi-3 re-computes its cache there (prepare_inputs_for_generation).
            self._gen_ctx = self._context(self._gen_total)
            return self._decode_pick(self._gen_ids, 0)
        return self._decode_pick([token], len(self._gen_ids) - 1)

    def _decode_pick(self, ids: list[int], n_past: int) -> int:
        """Decode `ids` at positions n_past.. and pick the next token from the last one's logits, in place."""
        *_, last = self._decode(self._gen_ctx, self._gen_batch, ids, n_past, n_past + len(ids) - 1)
        return self._choose(last)

    def _llg_tokenizer(self, n_vocab: int):
        """llguidance's view of the GGUF's own vocabulary (about a second at 200,064 tokens: made once)."""
        if self._llg is None:
            self._llg = guidance.tokenizer_from_llama(self.model.vocab, n_vocab, sorted(self.stop_ids()))
        return self._llg

    # -- tokenizer and template: the GGUF's own, as on a device
    def tokenize(self, text: str) -> list[int]:
        return list(self.model.tokenize(text.encode("utf-8"), add_bos=self.adds_bos, special=True))

    def detokenize(self, ids: list[int]) -> str:
        return self.model.detokenize(ids, special=False).decode("utf-8", errors="replace")

    def stop_ids(self) -> set[int]:
        """Every end-of-generation token of the vocabulary, found once (a pass over 200,064 ids through ctypes)."""
        if self._stops is None:
            ids = {self.model.token_eos(), self.model.token_eot()}
            for i in range(self.n_vocab):
                if self._lc.llama_vocab_is_eog(self.model.vocab, i):
                    ids.add(i)
            self._stops = frozenset(i for i in ids if i >= 0)
        return set(self._stops)

    def close(self) -> None:
        self._ctx = None
        self._lora = None
        self._loras.clear()                         # llama.cpp frees a model's adapters with the model
        self.model.close()
