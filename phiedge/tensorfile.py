"""safetensors files read with the standard library and numpy: the header (names, dtypes, shapes, offsets) and a
small file's tensors. Below both the build (phiedge.source checks checkpoints with it) and the device path (the
OpenVINO runtime reads an adapter with it), which imports nothing of the build.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import InvalidCheckpointError


def safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {dtype, shape, data_offsets}; raises InvalidCheckpointError on truncation/corruption."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InvalidCheckpointError(f"{path} is not a safetensors file ({size} bytes): copy it again")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or 8 + n > size:
            raise InvalidCheckpointError(f"{path} is truncated or corrupt (header of {n} bytes, file of {size}): "
                                         f"copy it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidCheckpointError(f"{path} has a corrupt safetensors header: copy it again") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end != size:
        raise InvalidCheckpointError(f"{path} is truncated (header says {end} bytes of tensor data, file has "
                                     f"{size - 8 - n}): copy it again")
    return header


SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}


def read_safetensors(path: Path) -> dict:
    """{tensor name: numpy array} of a small safetensors file (an adapter), with numpy alone: the device path has
    no torch and no safetensors package. bf16 is not read here (fp32 adapters are what phiedge writes)."""
    import numpy as np
    header = safetensors_header(path)
    raw = path.read_bytes()
    data = raw[8 + struct.unpack("<Q", raw[:8])[0]:]
    out = {}
    for name, t in header.items():
        if t["dtype"] not in SAFETENSORS_DTYPES:
            raise InvalidCheckpointError(f"{path}: tensor {name} is {t['dtype']}, which phiedge reads only as "
                                         f"{', '.join(SAFETENSORS_DTYPES)}: rebuild the adapter")
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=SAFETENSORS_DTYPES[t["dtype"]]).reshape(t["shape"])
    return out
