"""What the build's per-stage peaks and the up-front memory check read: a process tree's resident memory, and
what the machine can still give."""
from __future__ import annotations

import os
import time

import numpy as np
import psutil

from phiedge.memory import TreeSampler, available_bytes, tree_resident

MB = 2**20


def test_pages_a_forked_child_shares_count_once():
    """A forked child shares every page of its parent: summing RSS counts the buffer twice (the bench's OpenVINO
    export tree summed to 31 GB on a 25 GB machine that way); the tree's sum counts it once."""
    buf = np.ones(512 * MB // 8)                      # 512 MB, touched
    alone = tree_resident(os.getpid())
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                      # the child only holds the shared pages, then waits
        os.close(r)
        os.write(w, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        os.close(w)
        os.read(r, 1)
        child_rss = psutil.Process(pid).memory_info().rss
        assert child_rss > 500 * MB                   # plain RSS sees the whole buffer in the child too
        with TreeSampler(interval=0.05) as s:
            time.sleep(0.3)
        both = tree_resident(os.getpid())
        assert both < alone + 100 * MB, (alone / MB, both / MB)
        assert s.peak_mb < (alone + 100 * MB) / MB
        assert both > 512 * MB                        # and the buffer is still counted
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    del buf


def test_available_memory_is_what_the_machine_can_give():
    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    avail = available_bytes()
    assert 0 < avail <= vm.total + swap.total
    assert avail >= min(vm.available, 1 * 2**30) * 0.5     # not a cgroup figure gone wrong
