"""Calibration text for data-aware quantization: a capped, deterministic sample of the bundle's own documents.

At full size one fp32 forward of Phi-4-mini over 4200 tokens takes ~470 s on a 2-core machine, so a data-aware
pass over every document a user has could take hours. Every calibrating exporter reads `sample()`: token windows
cut from each document, taken round-robin across the documents (the first window of each, then the second of
each, ...) up to a token budget, so a small budget still sees every document. The sample's record (its token
count, windows and the sha256 of its token ids) goes into the artifact's meta and so into the manifest.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_TOKENS = 8192       # the build's --calibration-tokens default (GGUF's importance matrix reads this many)
MIN_WINDOW = 16             # a document's tail shorter than this (and than the window) is left out


@dataclass(frozen=True)
class Sample:
    windows: tuple[tuple[int, ...], ...]
    seq_len: int

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for w in self.windows:
            h.update(len(w).to_bytes(4, "little"))
            h.update(b"".join(t.to_bytes(4, "little") for t in w))
        return h.hexdigest()

    def record(self) -> dict:
        return {"tokens": self.tokens, "windows": len(self.windows), "seq_len": self.seq_len, "sha256": self.sha256}


def sample(model_dir: Path, texts: list[str], seq_len: int, budget: int) -> Sample:
    """At most `budget` tokens of the documents as windows of `seq_len` tokens (the model's own tokenizer),
    round-robin across the documents."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    seq_len = max(1, min(seq_len, budget))         # a budget below one window is one shorter window
    per_doc: list[list[list[int]]] = []
    for t in texts:
        if not t or not t.strip():
            continue
        ids = tok.encode(t, add_special_tokens=False).ids
        doc = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
        per_doc.append([w for w in doc if len(w) >= min(MIN_WINDOW, seq_len)])
    picked: list[tuple[int, ...]] = []
    used, depth = 0, 0
    while any(depth < len(d) for d in per_doc):
        for d in per_doc:
            if depth < len(d):
                if used + len(d[depth]) > budget:
                    return Sample(tuple(picked), seq_len)
                picked.append(tuple(d[depth]))
                used += len(d[depth])
        depth += 1
    return Sample(tuple(picked), seq_len)


def input_statistics(model_dir: Path, texts: list[str], seq_len: int, budget: int, what: str) -> tuple[dict, Sample]:
    """The sample of the documents and every Linear's input power over it (input_power on the checkpoint loaded as
    phiedge.torch_compute loads it), for a calibrating child; no window at all stops it, naming `what`."""
    from .torch_compute import load
    s = sample(model_dir, texts, seq_len, budget)
    if not s.windows:
        raise SystemExit(f"{what} needs calibration text: the documents gave no token windows")
    return input_power(load(model_dir), s.windows), s


def input_power(model, windows) -> dict[str, tuple[np.ndarray, int]]:
    """Every Linear's input statistics over the windows, from one PyTorch forward of the model (fp32 arithmetic on
    its stored weights, phiedge.torch_compute): HF module name -> (sum over tokens of each input column's squared
    activation, tokens). The LM head's entry is "lm_head" (its input is the decoder's last hidden state; its
    vocabulary-wide logits are never computed). Both data-aware quantizers read these: GGUF's importance matrix
    (_llama_imatrix) and ONNX's weighted int4 (_onnx_imatrix)."""
    import torch

    from .torch_compute import fp32_compute
    sums: dict[str, list] = {}

    def hook(name):
        def pre(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc = sums.setdefault(name, [torch.zeros(x.shape[1], dtype=torch.float64), 0])
            acc[0] += (x * x).sum(0)
            acc[1] += x.shape[0]
        return pre
    head = model.get_output_embeddings()
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head]
    try:
        with torch.no_grad(), fp32_compute():
            for w in windows:
                # The decoder only: the LM head's input is its last hidden state (its 200k-wide logits are not needed).
                h = model.get_decoder()(input_ids=torch.tensor([list(w)]), use_cache=False).last_hidden_state
                hook("lm_head")(None, (h.float(),))
    finally:
        for h in handles:
            h.remove()
    return {n: (s.numpy(), c) for n, (s, c) in sums.items()}
