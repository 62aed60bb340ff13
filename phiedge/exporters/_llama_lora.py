"""Run llama.cpp's convert_lora_to_gguf.py from its own directory: its `conversion` package and its own gguf-py
first on the path (they must win over any PyPI `gguf` in the environment), as phiedge.exporters._llama_convert
does for the model converter.

Usage: python -m phiedge.exporters._llama_lora LLAMA_DIR converter args...
"""
import runpy
import sys
from pathlib import Path


def main() -> None:
    llama_dir = Path(sys.argv[1])
    sys.path[:0] = [str(llama_dir / "gguf-py"), str(llama_dir)]
    sys.argv = [str(llama_dir / "convert_lora_to_gguf.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
