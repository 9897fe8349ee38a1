"""Whole-model inference latency of converted encoders against originals.

Each model runs as `model.predict` runs it (`predict_on_batch`, see
`keras_collab.conversion.latency.compiled_forward`: XLA on JAX and
TensorFlow, eager without gradients on PyTorch). For every point (model,
batch size, sequence length) the original and its converted models at
every D̃ are timed in one process, in alternating calls (the order rotating
from round to round), and the medians compared: ratio = converted /
original time, beside the FLOP ratio of `benchmarks.workloads.
encoder_flops` (what an ideal implementation would get). At each point the
suite also gives the D̃ below which the converted model is faster, linearly
interpolated between the measured D̃, and the D̃ at which the FLOPs break
even.

Models (`benchmarks.workloads.encoders`): the real all-MiniLM-L6-v2 at
D̃ = 384 (its full size H·d_k), 192, 96 and 48, and a random backbone of
BERT-base shape at D̃ = 768, 384, 192 and 96; batch 1 and 32, T = 128 and
512; `--quick`: a tiny random backbone. The converted models are
structural conversions (the values of the weights do not change the
time). Points run from the cheapest to the most expensive, so that
`--deadline-s` drops the most expensive ones.

Results: `inference_<backend>.{json,md,png}`, or `inference_all.*` for
`--backend-all`.
"""

import os
import time

from benchmarks.harness.markdown import environment_markdown
from benchmarks.harness.markdown import errors_markdown
from benchmarks.harness.markdown import markdown_table
from benchmarks.harness.options import config_with_options
from benchmarks.harness.options import integers
from benchmarks.harness.plots import label_dimensions
from benchmarks.harness.plots import new_figure
from benchmarks.harness.plots import save_figure
from benchmarks.harness.result_files import write_text
from benchmarks.harness.run import start_run
from benchmarks.harness.timing import time_alternating
from benchmarks.harness.timing import time_call
from benchmarks.workloads import encoder_flops

SUITE = "inference"
ORIGINAL = "original"

FULL = {
    "models": ["minilm", "bert_base"],
    "shared_key_dims": {
        "minilm": [384, 192, 96, 48],
        "bert_base": [768, 384, 192, 96],
    },
    "batch_sizes": [1, 32],
    "seq_lens": [128, 512],
    # Per point: seconds of timed rounds, within these bounds of rounds,
    # after the first (compiling) call and `warmup_calls` more of each (0:
    # the first call is the only warm-up).
    "budget_s": 10.0,
    "min_repeats": 3,
    "max_repeats": 25,
    "warmup_calls": 1,
    "deadline_s": None,
}
QUICK = {
    **FULL,
    "models": ["tiny"],
    "shared_key_dims": {"tiny": [32, 16, 8]},
    "batch_sizes": [2],
    "seq_lens": [32],
    "budget_s": 0.5,
    "min_repeats": 3,
    "max_repeats": 5,
}

# The shapes of the models, known without loading them, for the order of
# the points (checked against the loaded model in `_measure_point`).
SHAPES = {
    "minilm": encoder_flops.EncoderShape(6, 384, 12, 32, 32, 1536),
    "bert_base": encoder_flops.EncoderShape(12, 768, 12, 64, 64, 3072),
    "tiny": encoder_flops.EncoderShape(2, 32, 4, 8, 8, 64),
}

# Option -> configuration key.
_OPTIONS = {
    "models": "models",
    "batch_sizes": "batch_sizes",
    "seq_lens": "seq_lens",
    "budget_s": "budget_s",
    "min_repeats": "min_repeats",
    "max_repeats": "max_repeats",
    "warmup_calls": "warmup_calls",
    "deadline_s": "deadline_s",
}


def _names(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser):
    parser.add_argument(
        "--models",
        type=_names,
        help="Comma-separated models: minilm, bert_base, tiny (default "
        "minilm,bert_base; tiny with --quick).",
    )
    parser.add_argument(
        "--shared-key-dims",
        type=integers,
        help="Comma-separated D̃ for every model (default 384,192,96,48 for "
        "minilm, 768,384,192,96 for bert_base, 32,16,8 for tiny).",
    )
    parser.add_argument(
        "--batch-sizes",
        type=integers,
        help="Comma-separated batch sizes (default 1,32; 2 with --quick).",
    )
    parser.add_argument(
        "--seq-lens",
        type=integers,
        help="Comma-separated sequence lengths (default 128,512; 32 with "
        "--quick).",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        help="Seconds of timed rounds per point (default 10; 0.5 with "
        "--quick); the rounds stay within --min-repeats and --max-repeats.",
    )
    parser.add_argument(
        "--min-repeats",
        type=int,
        help="Fewest timed rounds per point (default 3).",
    )
    parser.add_argument(
        "--max-repeats",
        type=int,
        help="Most timed rounds per point (default 25; 5 with --quick).",
    )
    parser.add_argument(
        "--warmup-calls",
        type=int,
        help="Untimed calls of each model after its first, compiling call "
        "(default 1; 0: the first call is the only warm-up, which saves "
        "one call per model at the most expensive points).",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        help="Run no point that would end after this many seconds from the "
        "start (its duration estimated from the last point's seconds per "
        "FLOP); the points left out are recorded as skipped.",
    )


def resolve_config(args):
    """What to measure: the full or `--quick` configuration, then the
    options; checked."""
    config = config_with_options(args, FULL, QUICK, _OPTIONS)
    dims = getattr(args, "shared_key_dims", None)
    config["shared_key_dims"] = {
        model: list(
            config["shared_key_dims"].get(model, []) if dims is None else dims
        )
        for model in config["models"]
    }
    _check_config(config)
    return config


def _check_config(config):
    for model in config["models"]:
        if model not in SHAPES:
            raise ValueError(
                f"Unknown model {model!r}; expected one of {tuple(SHAPES)}"
            )
        if not config["shared_key_dims"][model]:
            raise ValueError(f"No D̃ given for model {model!r}")
    for key in ("batch_sizes", "seq_lens"):
        if not config[key] or min(config[key]) < 1:
            raise ValueError(f"{key} must be positive integers")
    if not 1 <= config["min_repeats"] <= config["max_repeats"]:
        raise ValueError("Need 1 <= --min-repeats <= --max-repeats")
    if config["warmup_calls"] < 0:
        raise ValueError("--warmup-calls must be >= 0")


# ---------------------------------------------------------------------------
# Break-even D̃ (no backend needed)
# ---------------------------------------------------------------------------


def break_even_dim(points):
    """The D̃ below which the converted model is faster, interpolated.

    Scanning up from the smallest measured D̃ while the converted model is
    faster (ratio < 1), the break-even lies between the last faster D̃ and
    the next one, where the ratio is linearly interpolated to 1 (FLOPs are
    affine in D̃).

    Args:
        points: `(D̃, ratio)` pairs, in any order.

    Returns:
        `(D̃ or None, how)`: `how` is `"interpolated"`, `"faster at every
        D̃"` (the D̃ is then the largest measured, a lower bound) or
        `"slower at every D̃"` (`None`; at the smallest D̃ already).
    """
    points = sorted(points)
    if not points or points[0][1] >= 1.0:
        return None, "slower at every D̃"
    for (low_dim, low), (high_dim, high) in zip(points, points[1:]):
        if high >= 1.0:
            fraction = (1.0 - low) / (high - low)
            return low_dim + fraction * (high_dim - low_dim), "interpolated"
    return points[-1][0], "faster at every D̃"


# ---------------------------------------------------------------------------
# Measurement (runs in a process of one backend)
# ---------------------------------------------------------------------------


def main(args):
    start = time.perf_counter()
    # Imported here: the backend must be chosen before Keras is imported.
    import keras

    backend = keras.backend.backend()
    config = resolve_config(args)
    run = start_run(SUITE, args, config, start)
    models = _ModelCache(config)
    rate = _Rate()
    for point in _points_by_cost(config):
        where = {"backend": backend, **point["where"]}
        try:
            _run_point(run, models, rate, point, where)
        except Exception as error:  # Recorded; the next point runs.
            run.document["errors"].append(
                {**where, "message": f"{type(error).__name__}: {error}"}
            )
            print(f"failed: {error!r}", flush=True)
    config["setup_s"] = models.setup_s
    return run.finish(report)


def _run_point(run, models, rate, point, where):
    """Measures one point, or records it as skipped by `--deadline-s`."""
    config = run.document["config"][where["backend"]]
    deadline_s = config["deadline_s"]
    estimate = None
    if not _past_deadline(run.start_time, deadline_s, estimate):
        # Loaded before the estimate and outside the point's clock, which
        # estimates the next points.
        models.get(where["model"])
        estimate = rate.seconds(point["flops_per_round"], config)
    if _past_deadline(run.start_time, deadline_s, estimate):
        run.document["errors"].append(
            {**where, "message": _skip_message(estimate)}
        )
        return
    print(f"timing {where} (estimated {_format_s(estimate)})", flush=True)
    point_start = time.perf_counter()
    rows, calls = _measure_point(models, config, where)
    seconds = time.perf_counter() - point_start
    rate.update(seconds, point["flops_per_round"] * calls)
    for row in rows:
        row["point_s"] = seconds
    run.document["rows"].extend(rows)
    run.document["rows"].append(_break_even_row(where, rows, models))
    run.save()


class _ModelCache:
    """Loads each model and its conversions when a point first needs them
    (the time is recorded per model, in `setup_s`)."""

    def __init__(self, config):
        self._config = config
        self._models = {}
        self.setup_s = {}

    def shape(self, name):
        return self.get(name)["shape"]

    def get(self, name):
        if name not in self._models:
            self._models[name] = self._load(name)
        return self._models[name]

    def _load(self, name):
        from benchmarks.workloads import encoders

        start = time.perf_counter()
        print(f"loading {name} and converting it", flush=True)
        original = encoders.load_backbone(name)
        shape = encoders.encoder_shape(original)
        dims = self._config["shared_key_dims"][name]
        for dim in dims:
            if not 1 <= dim <= shape.full_shared_key_dim:
                raise ValueError(
                    f"D̃={dim} must lie in [1, {shape.full_shared_key_dim}] "
                    f"for {name}"
                )
        converted = encoders.converted_backbones(original, dims)
        self.setup_s[name] = time.perf_counter() - start
        return {
            "original": original,
            "converted": converted,
            "shape": shape,
            "max_seq_len": original.max_sequence_length,
        }


def _points_by_cost(config):
    """Every (model, batch, T) point, cheapest first (FLOPs of one round:
    one call of the original and of each converted model)."""
    points = []
    for name in config["models"]:
        shape = SHAPES[name]
        for batch_size in config["batch_sizes"]:
            for seq_len in config["seq_lens"]:
                flops = encoder_flops.model_flops(shape, batch_size, seq_len)
                flops += sum(
                    encoder_flops.model_flops(shape, batch_size, seq_len, dim)
                    for dim in config["shared_key_dims"][name]
                )
                points.append(
                    {
                        "where": {
                            "model": name,
                            "batch_size": batch_size,
                            "seq_len": seq_len,
                        },
                        "flops_per_round": flops,
                    }
                )
    return sorted(points, key=lambda point: point["flops_per_round"])


class _Rate:
    """Seconds per FLOP of the last point measured, for estimates."""

    def __init__(self):
        self._seconds_per_flop = None

    def update(self, seconds, flops):
        self._seconds_per_flop = seconds / max(flops, 1)

    def seconds(self, flops_per_round, config):
        """Estimated seconds of a point: its first, warm-up and timed
        rounds at the last point's rate; `None` before any point."""
        if self._seconds_per_flop is None:
            return None
        round_s = self._seconds_per_flop * flops_per_round
        return round_s * _calls_per_model(round_s, config)


def _calls_per_model(round_s, config):
    """Calls of each model at a point: the first, the warm-up ones, and the
    timed rounds `time_alternating` chooses for rounds of `round_s`."""
    repeats = min(
        max(int(config["budget_s"] // max(round_s, 1e-9)), 0),
        config["max_repeats"],
    )
    repeats = max(repeats, config["min_repeats"])
    return 1 + config["warmup_calls"] + repeats


def _past_deadline(start, deadline_s, estimate_s):
    if deadline_s is None:
        return False
    end = time.perf_counter() + (estimate_s or 0.0)
    return end > start + deadline_s


def _skip_message(estimate):
    return f"skipped: would pass --deadline-s (estimated {_format_s(estimate)})"


def _format_s(seconds):
    return "?" if seconds is None else f"{seconds:.0f} s"


def _name(dim):
    return ORIGINAL if dim is None else f"collaborative_{dim}"


def _measure_point(models, config, where):
    """Times the original and every converted model at one point.

    Returns:
        `(rows, calls)`: one row per D̃, and the calls of each model made
        (for the seconds-per-FLOP estimate).
    """
    from keras_collab.conversion.latency import compiled_forward
    from keras_collab.conversion.latency import example_inputs

    name, batch_size, seq_len = (
        where["model"],
        where["batch_size"],
        where["seq_len"],
    )
    model = models.get(name)
    if model["shape"] != SHAPES[name]:
        raise ValueError(f"{name} has shape {model['shape']}, not SHAPES'")
    if seq_len > model["max_seq_len"]:
        raise ValueError(
            f"T={seq_len} exceeds {name}'s {model['max_seq_len']} positions"
        )
    inputs = example_inputs(model["original"], batch_size, seq_len)
    backbones = {ORIGINAL: model["original"]}
    backbones.update(
        {_name(dim): converted for dim, converted in model["converted"].items()}
    )
    steps = {
        key: _FirstCallTimed(compiled_forward(backbone), inputs)
        for key, backbone in backbones.items()
    }
    if config["warmup_calls"]:
        for step in steps.values():
            step()
    # With no warm-up call asked for, time_alternating's one warm-up round
    # is the first, compiling call.
    stats = time_alternating(
        steps,
        warmup_calls=max(config["warmup_calls"], 1),
        min_repeats=config["min_repeats"],
        max_repeats=config["max_repeats"],
        budget_s=config["budget_s"],
    )
    first_call_s = {key: step.first_call_s for key, step in steps.items()}
    rows = [
        _speed_row(where, model["shape"], dim, stats, first_call_s)
        for dim in model["converted"]
    ]
    calls = 1 + config["warmup_calls"] + stats[ORIGINAL].repeats
    return rows, calls


class _FirstCallTimed:
    """`forward(inputs)` as a step of no arguments that records how long
    its first call (the compilation included) took."""

    def __init__(self, forward, inputs):
        self._forward, self._inputs = forward, inputs
        self.first_call_s = None

    def __call__(self):
        if self.first_call_s is None:
            self.first_call_s = time_call(self._call)
        else:
            self._call()

    def _call(self):
        self._forward(self._inputs)


def _speed_row(where, shape, dim, stats, first_call_s):
    original, converted = stats[ORIGINAL], stats[_name(dim)]
    ratio = converted.median_s / original.median_s
    flop_ratio = encoder_flops.flop_ratio(shape, where["seq_len"], dim)
    return {
        "kind": "speed",
        **where,
        "shared_key_dim": dim,
        "full_key_dim": shape.full_shared_key_dim,
        "converted_ms": 1e3 * converted.median_s,
        "converted_p25_ms": 1e3 * converted.p25_s,
        "converted_p75_ms": 1e3 * converted.p75_s,
        "original_ms": 1e3 * original.median_s,
        "original_p25_ms": 1e3 * original.p25_s,
        "original_p75_ms": 1e3 * original.p75_s,
        "repeats": converted.repeats,
        "converted_first_call_s": first_call_s[_name(dim)],
        "original_first_call_s": first_call_s[ORIGINAL],
        "ratio": ratio,
        "flop_ratio": flop_ratio,
        # The bar: at most 1.05.
        "ratio_over_flop_ratio": ratio / flop_ratio,
        "faster": bool(ratio < 1.0),
    }


def _break_even_row(where, rows, models):
    dim, how = break_even_dim(
        [(row["shared_key_dim"], row["ratio"]) for row in rows]
    )
    shape = models.shape(where["model"])
    return {
        "kind": "break_even",
        **where,
        "break_even_dim": dim,
        "break_even": how,
        "flop_break_even_dim": encoder_flops.flop_break_even_dim(
            shape, where["seq_len"]
        ),
    }


# ---------------------------------------------------------------------------
# Report (no backend needed)
# ---------------------------------------------------------------------------


def report(document, output_dir, stem):
    """Writes the Markdown tables and the plot of a result document."""
    write_text(os.path.join(output_dir, f"{stem}.md"), _markdown(document))
    speed = [row for row in document["rows"] if row["kind"] == "speed"]
    if speed:
        _plot(speed, os.path.join(output_dir, f"{stem}.png"))


def _markdown(document):
    rows = document["rows"]
    speed = [row for row in rows if row["kind"] == "speed"]
    break_even = [row for row in rows if row["kind"] == "break_even"]
    quick = " (--quick)" if document["metadata"]["quick"] else ""
    parts = [
        f"# inference: converted encoders against their originals{quick}",
        "",
        "Whole-model `predict_on_batch` (compiled as `model.predict` "
        "compiles: XLA on JAX and TensorFlow, eager on PyTorch), float32, "
        "every token real. Times are medians of calls alternating between "
        "the original and its converted models at one point; ratio = "
        "converted / original; FLOP ratio = the same for an ideal "
        "implementation (projections, scores, mixing, context, output "
        "projection, feed-forward; `benchmarks/workloads/encoder_flops.py`"
        "); ratio / FLOP = how far the implementation is from that ideal.",
        "",
        environment_markdown(document),
        "## Speed",
        "",
        _speed_table(speed),
        "## Break-even D̃",
        "",
        "The converted model is faster below the measured D̃, a linear "
        "interpolation of the measured ratios between the two measured D̃ "
        "around 1 (not a measurement at that D̃); the FLOPs break even at "
        "the FLOP D̃, exactly.",
        "",
        _break_even_table(break_even),
    ]
    return "\n".join(parts) + errors_markdown(document)


def _speed_table(rows):
    return markdown_table(
        [
            "backend",
            "model",
            "batch:",
            "T:",
            "D̃:",
            "converted ms:",
            "original ms:",
            "ratio:",
            "FLOP ratio:",
            "ratio / FLOP:",
            "repeats:",
            "faster",
        ],
        [
            (
                row["backend"],
                row["model"],
                row["batch_size"],
                row["seq_len"],
                row["shared_key_dim"],
                row["converted_ms"],
                row["original_ms"],
                row["ratio"],
                row["flop_ratio"],
                row["ratio_over_flop_ratio"],
                row["repeats"],
                "yes" if row["faster"] else "no",
            )
            for row in rows
        ],
    )


def _break_even_table(rows):
    return markdown_table(
        [
            "backend",
            "model",
            "batch:",
            "T:",
            "faster below D̃ (interpolated):",
            "how",
            "FLOP break-even D̃:",
        ],
        [
            (
                row["backend"],
                row["model"],
                row["batch_size"],
                row["seq_len"],
                row["break_even_dim"],
                row["break_even"],
                row["flop_break_even_dim"],
            )
            for row in rows
        ],
    )


def _plot(rows, path):
    """Measured (solid) and FLOP (dashed) ratios against D̃, one panel per
    backend and model, one colour per (batch, T)."""
    panels = sorted({(row["backend"], row["model"]) for row in rows})
    figure, axes = new_figure(1, len(panels))
    for column, (backend, model) in enumerate(panels):
        ax = axes[0][column]
        panel = [
            row
            for row in rows
            if (row["backend"], row["model"]) == (backend, model)
        ]
        shapes = sorted({(row["batch_size"], row["seq_len"]) for row in panel})
        for index, (batch_size, seq_len) in enumerate(shapes):
            line = sorted(
                (
                    row
                    for row in panel
                    if (row["batch_size"], row["seq_len"])
                    == (batch_size, seq_len)
                ),
                key=lambda row: row["shared_key_dim"],
            )
            dims = [row["shared_key_dim"] for row in line]
            color = f"C{index}"
            ax.plot(
                dims,
                [row["ratio"] for row in line],
                "o-",
                color=color,
                label=f"batch {batch_size}, T={seq_len}",
            )
            flop_ratios = [row["flop_ratio"] for row in line]
            ax.plot(dims, flop_ratios, "--", color=color)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        label_dimensions(ax, sorted({row["shared_key_dim"] for row in panel}))
        ax.set_title(f"{backend}, {model}", fontsize=9)
        ax.set_xlabel("shared key size D̃")
        ax.set_ylabel("converted / original time")
        ax.legend(fontsize=7)
    figure.suptitle(
        "Whole-model predict time, converted / original (solid); FLOP "
        "ratio (dashed)",
        fontsize=10,
    )
    save_figure(figure, path)
