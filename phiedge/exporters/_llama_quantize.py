"""Quantize a GGUF with the installed llama.cpp (a subprocess, so a crash cannot take the build down).

With `--imatrix FILE` (llama.cpp's imatrix GGUF, phiedge.exporters._llama_imatrix) the quantizer weighs each
column's rounding error by its mean squared activation, exactly as `llama-quantize --imatrix` does: the file's
per-tensor sums divided by their token counts, handed over as `llama_model_quantize_params.imatrix`, with the
`quantize.imatrix.*` keys llama-quantize writes. `--output-type` sets the output tensor's type (the embedding's
too when it is tied: llama.cpp quantizes a tied embedding as the output).

Usage: python -m phiedge.exporters._llama_quantize SRC DEST FTYPE THREADS [--imatrix FILE --llama-dir DIR]
       [--output-type GGML_TYPE]
"""
import argparse
import ctypes
import sys
from pathlib import Path


def load_imatrix(path: Path, llama_dir: Path) -> tuple[dict, str, int]:
    """Tensor name -> mean squared activation per column, the dataset name and the chunk count."""
    import numpy as np
    sys.path[:0] = [str(llama_dir / "gguf-py")]
    import gguf
    r = gguf.GGUFReader(path)
    sums, counts = {}, {}
    for t in r.tensors:
        name, _, kind = t.name.rpartition(".")
        (sums if kind == "in_sum2" else counts)[name] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    data = {n: (s / counts[n][0] if counts[n][0] > 0 else np.ones_like(s)).astype(np.float32)
            for n, s in sums.items()}
    dataset = bytes(r.fields[gguf.Keys.IMatrix.DATASETS].parts[-1]).decode()
    chunks = int(r.fields[gguf.Keys.IMatrix.CHUNK_COUNT].parts[-1][0])
    return data, dataset, chunks


def main() -> int:
    import llama_cpp
    ap = argparse.ArgumentParser()
    for a in ("src", "dest"):
        ap.add_argument(a)
    ap.add_argument("ftype", type=int)
    ap.add_argument("threads", type=int)
    ap.add_argument("--imatrix", type=Path)
    ap.add_argument("--llama-dir", type=Path)
    ap.add_argument("--output-type", type=int)
    a = ap.parse_args()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = a.ftype
    params.nthread = a.threads
    if a.output_type is not None:
        params.output_tensor_type = a.output_type
    keep = []
    if a.imatrix:
        data, dataset, chunks = load_imatrix(a.imatrix, a.llama_dir)
        entries = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()
        for i, (name, v) in enumerate(sorted(data.items())):
            keep += [name.encode(), v]
            entries[i].name, entries[i].size = keep[-2], v.size
            entries[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
        kv = (llama_cpp.llama_model_kv_override * 4)()
        for o, (key, value) in zip(kv, (("quantize.imatrix.dataset", dataset[:127].encode()),
                                       ("quantize.imatrix.entries_count", len(data)),
                                       ("quantize.imatrix.chunks_count", chunks))):
            o.key = key.encode()
            if isinstance(value, bytes):
                o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value
            else:
                o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
        params.kv_overrides = kv            # the zeroed last entry (empty key) ends the list
    rc = llama_cpp.llama_model_quantize(a.src.encode(), a.dest.encode(), params)
    if rc != 0:
        print(f"llama_model_quantize returned {rc}", file=sys.stderr)
    return 1 if rc != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
