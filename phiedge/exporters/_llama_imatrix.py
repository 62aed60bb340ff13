"""An importance matrix for llama.cpp's quantizer from the bundle's own documents, in llama.cpp's imatrix format.

A PyTorch forward of the checkpoint (fp32 arithmetic on its stored weights, phiedge.checks.reference) over the
calibration sample (phiedge.calibration); for every Linear of the decoder and for the LM head, the sum over tokens
of each input column's squared activation. Written as llama.cpp's `llama-imatrix` writes it (a GGUF of
`<tensor>.in_sum2` / `<tensor>.counts` pairs with `imatrix.datasets`, `imatrix.chunk_count` and
`imatrix.chunk_size`), keyed by the tensor names of the converted GGUF: `llama-quantize --imatrix` reads the same
file. The LM head's entry goes to `output.weight`, or to `token_embd.weight` when the embedding is tied (llama.cpp
then quantizes the embedding as the output tensor). Every quantizable block weight of the GGUF must get an entry of
its width, or this fails naming the first one missing.

Usage: python -m phiedge.exporters._llama_imatrix LLAMA_DIR JOB.json
JOB: {"model": dir, "gguf": converted GGUF, "out": imatrix path, "texts": [...], "seq_len": n, "budget": n}
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def gguf_names(gguf_file: Path, hf_names: list[str]) -> tuple[dict[str, str], dict[str, int], str]:
    """HF module name -> GGUF tensor name, the GGUF's quantizable weights -> width, and its architecture."""
    import gguf
    reader = gguf.GGUFReader(gguf_file)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    n_blocks = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
    widths = {t.name: int(t.shape[0]) for t in reader.tensors if len(t.shape) >= 2 and t.name.endswith(".weight")}
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tmap = gguf.get_tensor_name_map(arch_id, n_blocks)
    out = {}
    for n in hf_names:
        if n == "lm_head":
            out[n] = "output.weight" if "output.weight" in widths else "token_embd.weight"
            continue
        g = tmap.get_name(n)
        if g is not None:
            out[n] = g + ".weight"
    return out, widths, arch


def write(path: Path, arch: str, entries: dict[str, tuple[np.ndarray, int]], chunks: int, chunk_size: int,
          dataset: str) -> None:
    import gguf
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, chunks)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
    for name, (s, count) in sorted(entries.items()):
        w.add_tensor(f"{name}.in_sum2", s.astype(np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> int:
    llama_dir, job = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    sys.path[:0] = [str(llama_dir / "gguf-py")]     # llama.cpp's own gguf-py, as the converter uses
    from phiedge.calibration import input_statistics
    t0 = time.perf_counter()
    sums, s = input_statistics(Path(job["model"]), job["texts"], job["seq_len"], job["budget"], "the importance matrix")
    names, widths, arch = gguf_names(Path(job["gguf"]), list(sums))
    entries = {names[n]: v for n, v in sums.items() if n in names}
    for t, width in widths.items():
        if t.startswith("blk.") and (t not in entries or entries[t][0].shape[0] != width):
            raise SystemExit(f"importance matrix: no statistics of width {width} for {t} (mapped from the "
                             f"checkpoint's modules: {sorted(names.values())[:4]}...)")
    out = Path(job["out"])
    write(out, arch, entries, len(s.windows), s.seq_len, f"phiedge calibration sha256:{s.sha256}")
    (out.with_suffix(".json")).write_text(json.dumps({**s.record(), "entries": len(entries),
                                                       "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
