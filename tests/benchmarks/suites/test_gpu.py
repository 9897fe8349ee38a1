from benchmarks.suites import gpu


def test_gpu_deadlines_share_the_time_left():
    first = gpu._deadline_for_next_backend(0, 3)
    assert first == gpu.TOTAL_BUDGET_S / 3 - gpu.RESERVE_PER_BACKEND_S
    # A backend that starts late still gets the minimum.
    assert gpu._deadline_for_next_backend(10**4, 1) == gpu.MIN_DEADLINE_S
