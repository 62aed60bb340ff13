"""Logging as the CLI sets it up, in the build process and in the children it spawns (memory.isolated)."""
from __future__ import annotations

import logging
import os
import sys

NOISY = ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers", "peft", "accelerate", "matplotlib")


def configure(verbose: bool) -> None:
    """phiedge's own steps at INFO (every step at DEBUG with --verbose); chatty libraries only on --verbose."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:     # read when transformers is first imported, here or in a child process
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
