"""Facts of phiedge's OpenVINO IR artifacts that the exporter writes and the runtime reads: file names, the CPU
settings that compute as PyTorch's reference does, and one prefill's inputs. A leaf module (numpy only), so the
exporter's stage fingerprint does not follow the runtime's code, nor the runtime the exporter's.
"""
from __future__ import annotations

import numpy as np

META_FILE = "phiedge_openvino.json"
IR = "openvino_model.xml"
# The CPU plugin computing as PyTorch's reference does: f32 inference (an AMX CPU's default is bf16), an f32 KV
# cache (the default is u8) and no dynamic 8-bit quantization of activations.
EXACT_CPU = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
ADAPTER_FILE = "adapter_model.safetensors"     # PEFT's layout, scaling folded in (phiedge.exporters.openvino)


def prefill_inputs(ids: list[int], start: int = 0) -> dict[str, np.ndarray]:
    """The stateful IR's inputs for one prefill of `ids` at positions start.. on a fresh request."""
    n = len(ids)
    return {"input_ids": np.asarray([ids], dtype=np.int64), "attention_mask": np.ones((1, n), dtype=np.int64),
            "position_ids": np.arange(start, start + n, dtype=np.int64)[None], "beam_idx": np.zeros(1, dtype=np.int32)}
