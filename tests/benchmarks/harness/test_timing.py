from benchmarks.harness.timing import TimingStats
from benchmarks.harness.timing import time_alternating


def test_time_alternating_rotates_and_bounds_repeats():
    calls = []
    callables = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    stats = time_alternating(
        callables, warmup_calls=1, min_repeats=4, max_repeats=4, budget_s=1.0
    )
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    timed = calls[3:]
    assert timed[:6] == ["a", "b", "c", "b", "c", "a"]
    assert all(stats[name].repeats == 4 for name in "abc")
    assert stats["a"].min_s <= stats["a"].median_s <= stats["a"].p75_s


def test_timing_stats_median():
    stats = TimingStats.from_samples([3.0, 1.0, 2.0])
    assert stats.median_s == 2.0
    assert stats.min_s == 1.0
    assert stats.repeats == 3
