"""Run llama.cpp's convert_hf_to_gguf.py (from its own directory) with two decisions phiedge made from
tokenizer.json itself (phiedge.exporters.gguf):

- VOCAB `gpt2`: the tokenizer is a byte-level BPE, so the Phi-3 converter takes its GPT-2/BPE path. It decides
  by the `tokenizer_class` name in tokenizer_config.json, and every tokenizer saved by transformers >= 5 says
  "TokenizersBackend" there (or nothing): it then took the SentencePiece path and asked for tokenizer.model.
- PRE_TOKENIZER: when the converter's pre-tokenizer hash table does not know the tokenizer, the pre-tokenizer
  decided from the tokenizer's split regex.

Usage: python -m phiedge.exporters._llama_convert LLAMA_DIR VOCAB PRE_TOKENIZER converter args...
(VOCAB / PRE_TOKENIZER may be empty: then the converter's own decision stands, errors included.)
"""
import logging
import runpy
import sys
from pathlib import Path


def main() -> None:
    llama_dir, vocab, pre = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    # llama.cpp's own gguf-py must win over any PyPI `gguf` in the environment.
    sys.path[:0] = [str(llama_dir / "gguf-py"), str(llama_dir)]
    from conversion import base, phi

    if vocab == "gpt2":
        phi.Phi3MiniModel.set_vocab = base.TextModel._set_vocab_gpt2

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
    sys.argv = [str(llama_dir / "convert_hf_to_gguf.py"), *sys.argv[4:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
