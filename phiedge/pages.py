"""Letting go of a memory-mapped file's pages once read (Linux): standard library only, so the device path
(the GGUF runtime) uses it as the build's exporters do.

A process reading a memory-mapped model weight by weight (transformers' safetensors, OpenVINO's IR .bin,
llama.cpp's GGUF repacked into its own buffers) keeps every page it touched resident, counted in its memory,
though it needs each weight once. MADV_DONTNEED lets them go: the page cache keeps them, outside the process's
memory, and a page read again faults back in from the file, the same bytes.
"""
from __future__ import annotations

import threading
from pathlib import Path

MADV_DONTNEED = 4                       # Linux <sys/mman.h>


def drop_mapped_pages(suffix: str) -> None:
    """Let go of the resident pages of every memory-mapped file of this process whose path ends with `suffix`
    (Linux; elsewhere nothing): at 3.8 B parameters 7.7 GB of checkpoint pages by the end of a weight-by-weight
    pass. A private mapping only when nothing has written to it (its dirty pages are copies: dropping them would
    lose the writes); a shared one always (its pages are the file's, the page cache keeps them, dirty or not).
    Safe while another thread reads the mapping. Reading /proc/self/smaps costs ~30 ms: call it per hundreds of
    MB, not per weight."""
    import ctypes
    try:
        smaps = Path("/proc/self/smaps").read_text().splitlines()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    ranges, current = [], None
    for line in smaps:
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:      # a mapping's header
            current = None
            if len(fields) >= 6 and fields[5].endswith(suffix):
                current = [int(x, 16) for x in fields[0].split("-")]
                ranges.append(current)
                if fields[1][3:4] != "p":   # shared: its dirty pages are the file's own (written, not yet flushed)
                    current = None
        elif current is not None and fields[:1] == ["Private_Dirty:"] and int(fields[1]) != 0:
            ranges.remove(current)
            current = None
    for start, end in ranges:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


class MappedPagesDropped:
    """`drop_mapped_pages(suffix)` every `every` seconds on a thread while the block runs: for a library's own loop
    over a mapped model (NNCF's weight compression), where no call of ours sits between weights."""

    def __init__(self, suffix: str, every: float = 2.0):
        self.suffix, self.every, self._stop = suffix, every, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            drop_mapped_pages(self.suffix)

    def __enter__(self) -> "MappedPagesDropped":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
