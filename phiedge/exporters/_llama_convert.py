"""Run llama.cpp's convert_hf_to_gguf.py (from its own directory) with one change: when its pre-tokenizer
hash table does not know the tokenizer, use the pre-tokenizer phiedge decided from the tokenizer's regex.

Usage: python -m phiedge.exporters._llama_convert LLAMA_DIR PRE_TOKENIZER -- converter args...
(PRE_TOKENIZER may be empty: then the converter's own decision stands, errors included.)
"""
import logging
import runpy
import sys
from pathlib import Path


def main() -> None:
    llama_dir, pre = Path(sys.argv[1]), sys.argv[2]
    # llama.cpp's own gguf-py must win over any PyPI `gguf` in the environment.
    sys.path[:0] = [str(llama_dir / "gguf-py"), str(llama_dir)]
    from conversion import base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if not pre:
                raise
            logging.getLogger("phiedge").warning(
                "pre-tokenizer hash not in llama.cpp's table; using '%s' decided from the tokenizer's split regex", pre)
            return pre

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(llama_dir / "convert_hf_to_gguf.py"), *sys.argv[3:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
