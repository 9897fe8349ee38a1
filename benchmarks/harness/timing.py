"""Timing: alternating calls, medians and percentiles."""

import dataclasses
import gc
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class TimingStats:
    """Summary of the wall times of repeated calls, in seconds.

    Attributes:
        median_s: Median time of one call, the number to compare.
        p25_s: 25th percentile.
        p75_s: 75th percentile.
        min_s: Fastest call.
        repeats: Number of timed calls.
    """

    median_s: float
    p25_s: float
    p75_s: float
    min_s: float
    repeats: int

    @classmethod
    def from_samples(cls, samples):
        samples = np.asarray(samples, dtype=float)
        p25, median, p75 = np.percentile(samples, [25, 50, 75])
        return cls(
            median_s=float(median),
            p25_s=float(p25),
            p75_s=float(p75),
            min_s=float(samples.min()),
            repeats=int(samples.size),
        )


def time_call(function):
    """Seconds taken by one call of `function()`."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def time_alternating(
    callables,
    warmup_calls=2,
    min_repeats=5,
    max_repeats=50,
    budget_s=10.0,
):
    """Times several callables in alternation and returns their medians.

    Each callable is first called `warmup_calls` times untimed: callers that
    want the compilation time time a first call themselves with `time_call`.
    Then the callables are called in rounds, one call each per round, so that
    slow drifts of the machine (other processes, clock frequency, memory
    fragmentation) hit all of them alike; the order within a round rotates so
    that none of them always runs right after the same one. The garbage
    collector is paused while timing.

    Args:
        callables: Mapping from a name to a function of no arguments that
            returns only once its computation is finished (it synchronises
            with the device itself).
        warmup_calls: Untimed calls of each callable before timing, at least
            one.
        min_repeats: Fewest timed rounds.
        max_repeats: Most timed rounds.
        budget_s: Time to spend on the timed rounds; the number of rounds is
            estimated from the last warm-up round, between the two bounds.

    Returns:
        A dict mapping each name to its `TimingStats`.
    """
    names = list(callables)
    last_call_s = {}
    for name in names:
        for _ in range(max(warmup_calls, 1)):
            last_call_s[name] = time_call(callables[name])
    round_s = max(sum(last_call_s.values()), 1e-9)
    repeats = int(np.clip(budget_s // round_s, min_repeats, max_repeats))

    samples = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(time_call(callables[name]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: TimingStats.from_samples(samples[name]) for name in names}
