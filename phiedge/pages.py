"""Letting go of a memory-mapped file's pages once read (Linux): standard library only, so the device path
(the GGUF runtime) uses it as the build's exporters do.

A process reading a memory-mapped model weight by weight (transformers' safetensors, OpenVINO's IR .bin,
llama.cpp's GGUF repacked into its own buffers) keeps every page it touched resident, counted in its memory,
though it needs each weight once. MADV_DONTNEED lets them go: the page cache keeps them, outside the process's
memory, and a page read again faults back in from the file, the same bytes.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

MADV_DONTNEED = 4                       # Linux <sys/mman.h>


@dataclass(frozen=True)
class Mapping:
    """One memory mapping of a file, as /proc/self/smaps reports it (sizes in bytes)."""
    start: int
    end: int
    shared: bool
    rss: int
    private_dirty: int


def mappings(suffix: str) -> list[Mapping]:
    """This process's memory mappings of files whose path ends with `suffix` (Linux; elsewhere none)."""
    try:
        smaps = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return []
    out, current = [], None
    for line in smaps:
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:      # a mapping's header
            current = None
            if len(fields) >= 6 and fields[5].endswith(suffix):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = {"start": start, "end": end, "shared": fields[1][3:4] != "p", "rss": 0, "private_dirty": 0}
                out.append(current)
        elif current is not None and fields[:1] in (["Rss:"], ["Private_Dirty:"]):
            current[fields[0][:-1].lower()] = int(fields[1]) * 1024
    return [Mapping(**m) for m in out]


def drop_mapped_pages(suffix: str) -> None:
    """Let go of the resident pages of every memory-mapped file of this process whose path ends with `suffix`
    (Linux; elsewhere nothing): at 3.8 B parameters 7.7 GB of checkpoint pages by the end of a weight-by-weight
    pass. A private mapping only when nothing has written to it (its dirty pages are copies: dropping them would
    lose the writes); a shared one always (its pages are the file's, the page cache keeps them, dirty or not).
    Safe while another thread reads the mapping. Reading /proc/self/smaps costs ~30 ms: call it per hundreds of
    MB, not per weight."""
    import ctypes
    ranges = [m for m in mappings(suffix) if m.shared or not m.private_dirty]
    if not ranges:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    for m in ranges:
        libc.madvise(ctypes.c_void_p(m.start), ctypes.c_size_t(m.end - m.start), MADV_DONTNEED)


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
