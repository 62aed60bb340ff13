"""Quantize a GGUF with the installed llama.cpp (a subprocess, so a crash cannot take the build down).

Usage: python -m phiedge.exporters._llama_quantize SRC DEST FTYPE THREADS
"""
import sys


def main() -> int:
    import llama_cpp
    src, dest, ftype, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dest.encode(), params)
    if rc != 0:
        print(f"llama_model_quantize returned {rc}", file=sys.stderr)
    return 1 if rc != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
