"""PyTorch models as phiedge runs them at build time: a checkpoint loaded in its own dtype, and half-precision
weights computed in fp32. Shared by the reference (phiedge.checks.reference), the merge proof and calibration, and
kept apart from them so that a change to the reference does not re-run the calibrating exports.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from .source import checkpoint_dtype

# fp32_compute upcasts a half-precision weight in slices of this many bytes, each into the same buffer: small
# enough to stay in the CPU's caches between the upcast and the matmul that reads it, and never a fresh
# allocation (a fresh 256 MB slice per weight faulted in 15 GB of new pages per decoded token at Phi-4-mini's
# size). Measured on the 3.84 B model, 2 cores: a greedy token 0.45 s instead of 5.9 s, a 1024-token forward
# 43 s instead of 49 s (64 MB slices: 51 s).
UPCAST_SLICE_BYTES = 8 * 2**20


@contextmanager
def fp32_compute():
    """Run a half-precision checkpoint's forward in fp32, weights kept as stored (upcast per layer, on the fly).

    On CPUs without AVX-512 BF16 / AMX, torch's bf16 matmul has no fast kernel: 0.1 GFLOPS against 50 for fp32
    on this 2-core AVX2 machine, so one forward of the real Phi-4-mini over the 233-token proof probe took more
    than 13 minutes and the 4200-token reference would take days. Upcasting each weight as it is used costs one
    extra read of the weights per forward and one fp32 buffer of UPCAST_SLICE_BYTES per thread (slices of rows
    of the output dimension: each output is the same dot product), and the activations are fp32, which is also
    the better reference.
    A no-op for fp32 checkpoints."""
    import threading

    import torch
    import torch.nn.functional as F
    lin, emb = torch.nn.Linear.forward, torch.nn.Embedding.forward
    local = threading.local()

    def linear(self, x):
        w = self.weight
        if w.dtype not in (torch.bfloat16, torch.float16):
            return lin(self, x)
        x, b = x.float(), None if self.bias is None else self.bias.float()
        rows = max(1, UPCAST_SLICE_BYTES // (4 * w.shape[1]))
        if getattr(local, "buf", None) is None or local.buf.numel() < rows * w.shape[1]:
            local.buf = torch.empty(rows * w.shape[1], dtype=torch.float32)
        out = []
        for i in range(0, w.shape[0], rows):
            part = w[i:i + rows]
            out.append(F.linear(x, local.buf[:part.numel()].view(part.shape).copy_(part),
                                None if b is None else b[i:i + rows]))
        return out[0] if len(out) == 1 else torch.cat(out, dim=-1)

    def embedding(self, ids):
        out = emb(self, ids)
        return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out

    torch.nn.Linear.forward, torch.nn.Embedding.forward = linear, embedding
    try:
        yield
    finally:
        torch.nn.Linear.forward, torch.nn.Embedding.forward = lin, emb


def load(model_dir: Path):
    """The checkpoint in its own dtype, for inference."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, checkpoint_dtype(model_dir)),
                                                 low_cpu_mem_usage=True)
    model.eval()
    return model
