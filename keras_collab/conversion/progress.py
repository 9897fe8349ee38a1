"""Progress of a conversion: a progress bar over long loops (layers,
refinement steps), and the wall time of each stage of `convert_model`."""

import contextlib
import time

import keras

# The stages of `convert_model`, in pipeline order, as the conversion report
# names them (`ModelConversion.stage_seconds`, the CLI's
# `conversion_stage_seconds`). "decomposition" is the solver (the CP fits of
# every layer) with the new layers built from its factors.
STAGES = (
    "calibration",
    "decomposition",
    "assembly",
    "refinement",
    "distillation",
)


def progress_bar(items, description, enabled=True):
    """Yields `items`, showing Keras' progress bar when `enabled`.

    Keras' `Progbar` is already a dependency and prints to stdout like
    `fit()` does, so conversions look like the rest of Keras.
    """
    items = list(items)
    if not enabled or not items:
        yield from items
        return
    print(description)
    bar = keras.utils.Progbar(len(items), unit_name="layer")
    for index, item in enumerate(items):
        yield item
        bar.update(index + 1)


class StageClock:
    """Wall time of each of the `STAGES`, and of the whole.

    The clock starts when created. `seconds()` gives every stage (0 for
    those that did not run), `other` for the time outside them (finding the
    attention sites, checks) and `total`, which is their sum.

    Example:

    >>> clock = StageClock()
    >>> with clock.stage("calibration"):
    ...     pass
    >>> times = clock.seconds()
    >>> list(times) == [*STAGES, "other", "total"]
    True
    """

    def __init__(self):
        self._start = time.perf_counter()
        self._stages = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def stage(self, name):
        """Adds the wall time of the `with` block to stage `name`."""
        if name not in self._stages:
            raise ValueError(
                f"Unknown conversion stage {name!r}; expected one of {STAGES}."
            )
        start = time.perf_counter()
        try:
            yield
        finally:
            self._stages[name] += time.perf_counter() - start

    def seconds(self):
        """`{stage: seconds, "other": seconds, "total": seconds}`."""
        total = time.perf_counter() - self._start
        staged = sum(self._stages.values())
        return {
            **self._stages,
            "other": max(total - staged, 0.0),
            "total": total,
        }


def format_stage_seconds(seconds):
    """`StageClock.seconds()` in one line: the stages that took time.

    >>> format_stage_seconds({"calibration": 1.25, "decomposition": 3.0,
    ...     "assembly": 0.5, "refinement": 0.0, "distillation": 0.0,
    ...     "other": 0.05, "total": 4.8})
    'calibration 1.2 s, decomposition 3.0 s, assembly 0.5 s, other 0.1 s'
    """
    parts = [
        f"{name} {value:.1f} s"
        for name, value in seconds.items()
        if name != "total" and value > 0.0
    ]
    return ", ".join(parts)
