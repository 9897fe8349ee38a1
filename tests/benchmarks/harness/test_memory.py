import sys

import numpy as np
import pytest

from benchmarks.harness.memory import MIB
from benchmarks.harness.memory import PeakMemoryTracker


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self"
)
def test_cpu_peak_memory_tracker_sees_a_large_allocation():
    tracker = PeakMemoryTracker("jax", "cpu")
    if not tracker.resettable:
        pytest.skip("/proc/self/clear_refs is not writable")
    tracker.start()
    block = np.ones(8 * 2**20)  # 64 MiB, served by mmap and touched
    del block
    assert tracker.peak_growth_bytes() >= 60 * MIB
