"""Speed and memory of collaborative vs. Keras multi-head attention.

Times `CollaborativeMultiHeadAttention` against Keras' `MultiHeadAttention` at
the shape of a BERT-base attention layer (model width 768, 12 heads of size
64), self-attention without mask, float32, forward and forward+backward,
for several shared key sizes D̃, with per-head values or with shared
values of size D̃_v (`--points 192:192`). Each pass is compiled where the backend
compiles (see `benchmarks.workloads.attention_steps`). All layers of one
group (same backend, variant, sequence length and mode) are timed in
alternation in one process, and the medians compared: the ratio
collaborative / MHA sits beside the ratio of their FLOPs, the speed-up an
ideal implementation would get.

Peak memory of the forward+backward pass is measured in a separate process
(see `benchmarks.suites.memory_probe`), so that its allocator settings do
not slow the timings down.

Results: `layer_speed_<backend>.{json,md,png}`, or `layer_speed_all.*` for
`--backend-all`.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.harness.backends import child_environment
from benchmarks.harness.markdown import environment_markdown
from benchmarks.harness.markdown import errors_markdown
from benchmarks.harness.markdown import markdown_table
from benchmarks.harness.memory import CPU_MEMORY_ENVIRONMENT
from benchmarks.harness.memory import PeakMemoryTracker
from benchmarks.harness.metadata import detect_accelerator
from benchmarks.harness.options import dimension_points
from benchmarks.harness.options import integers
from benchmarks.harness.plots import label_dimensions
from benchmarks.harness.plots import new_figure
from benchmarks.harness.plots import save_figure
from benchmarks.harness.result_files import read_json
from benchmarks.harness.result_files import write_text
from benchmarks.harness.run import start_run
from benchmarks.harness.timing import time_alternating
from benchmarks.harness.timing import time_call

SUITE = "layer_speed"

# BERT-base attention.
MODEL_DIM = 768
NUM_HEADS = 12
KEY_DIM = 64
VALUE_DIM = 64

# The issues' goals for forward+backward: collaborative / MHA median time
# at most these ratios, keyed by (D̃, D̃_v, T); D̃_v None for per-head values.
# The FLOP ideal is 0.73 / 0.97 at D̃ = 192 with per-head values.
TARGET_SHARED_KEY_DIM = 192
TARGET_MODE = "forward_backward"
TARGET_RATIOS = {
    (192, None, 128): 0.80,
    (192, None, 512): 1.05,
    (192, 192, 512): 1.0,
}

FULL_SHARED_KEY_DIMS = (768, 384, 192, 96)
# (D̃, D̃_v) points with shared values, run after the per-head D̃.
FULL_POINTS = ((192, 192),)
CPU_SEQ_LENS = (128, 512)
ACCELERATOR_SEQ_LENS = (128, 512, 2048)

# How long to time each group, and within which bounds of repetitions. CPU
# passes take up to seconds at T = 512; accelerator passes take milliseconds.
TIMING = {
    "quick": {"budget_s": 2.0, "min_repeats": 3, "max_repeats": 10},
    "cpu": {"budget_s": 10.0, "min_repeats": 5, "max_repeats": 30},
    "accelerator": {"budget_s": 5.0, "min_repeats": 10, "max_repeats": 100},
}

# The memory probe measures the pass that needs the most memory.
MEMORY_MODE = "forward_backward"


def add_arguments(parser):
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="Batch size (default 8, 2 with --quick).",
    )
    parser.add_argument(
        "--seq-lens",
        type=integers,
        default=None,
        help="Comma-separated sequence lengths (default 128,512, plus 2048 "
        "on a GPU or TPU; 128 with --quick).",
    )
    parser.add_argument(
        "--shared-key-dims",
        type=integers,
        default=None,
        help="Comma-separated shared key sizes D̃ with per-head values "
        "(default 768,384,192,96; 192 with --quick).",
    )
    parser.add_argument(
        "--points",
        type=dimension_points,
        default=None,
        help="Layers timed after those of --shared-key-dims: D̃:D̃_v (shared "
        "values of size D̃_v) or D̃ (per-head values), e.g. 192:192,96:96 "
        "(default 192:192; '' for none).",
    )
    parser.add_argument(
        "--torch-compile",
        choices=("target", "all", "none"),
        default="target",
        help="Which D̃ get a torch.compile variant, besides eager: the "
        f"target D̃={TARGET_SHARED_KEY_DIM} only (default; each compilation "
        "takes tens of seconds), all, or none.",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="Seconds of timed calls per group (default 10 on CPU, 5 on an "
        "accelerator, 2 with --quick).",
    )
    parser.add_argument(
        "--memory-shared-key-dims",
        type=integers,
        default=None,
        help="D̃ whose peak memory is measured, with per-head values "
        "(default: those timed; the --points are measured too).",
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="Skip the peak-memory measurements.",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="Start no new timing group after this many seconds; the rest is "
        "recorded as skipped. The memory probe runs whatever the time.",
    )


# ---------------------------------------------------------------------------
# FLOP model
# ---------------------------------------------------------------------------


def attention_flops(seq_len, shared_key_dim=None, shared_value_dim=None):
    """FLOPs of one self-attention sequence at BERT-base shape.

    Counts the query/key/value/output projections, the attention scores,
    the context (the weighted sum of values) and the mixing of collaborative
    heads, 2 FLOPs per multiply-add; softmax, biases and the content bias
    are negligible and left out.

    Args:
        seq_len: Sequence length T.
        shared_key_dim: `None` for Keras multi-head attention, else the
            shared key size D̃ of collaborative attention.
        shared_value_dim: With `shared_key_dim`, the shared value size D̃_v,
            or `None` for per-head values.

    Returns:
        A dict of FLOPs per term, and their `"total"`.
    """
    collaborative = shared_key_dim is not None
    shared_values = collaborative and shared_value_dim is not None
    query_key_dim = shared_key_dim if collaborative else NUM_HEADS * KEY_DIM
    # Every head scores with the full shared key in collaborative attention,
    # and, with shared values, sums the full shared value.
    score_dim = shared_key_dim if collaborative else KEY_DIM
    value_dim = shared_value_dim if shared_values else NUM_HEADS * VALUE_DIM
    context_dim = shared_value_dim if shared_values else VALUE_DIM
    # The key side scales each head's query by its mixing vector; shared
    # values scale each head's context by its value mixing vector.
    mixing = 2 * NUM_HEADS * seq_len * shared_key_dim if collaborative else 0
    if shared_values:
        mixing += 2 * NUM_HEADS * seq_len * shared_value_dim
    terms = {
        "query_key_projections": 2 * seq_len * MODEL_DIM * query_key_dim * 2,
        "value_projection": 2 * seq_len * MODEL_DIM * value_dim,
        "output_projection": 2 * seq_len * value_dim * MODEL_DIM,
        "scores": 2 * NUM_HEADS * seq_len**2 * score_dim,
        "mixing": mixing,
        "context": 2 * NUM_HEADS * seq_len**2 * context_dim,
    }
    terms["total"] = sum(terms.values())
    return terms


def flop_ratio(seq_len, shared_key_dim, shared_value_dim=None):
    """FLOPs of collaborative attention over those of Keras MHA."""
    return (
        attention_flops(seq_len, shared_key_dim, shared_value_dim)["total"]
        / attention_flops(seq_len)["total"]
    )


def target_ratio(mode, seq_len, shared_key_dim, shared_value_dim=None):
    """The goal for collaborative / MHA time at a point, or `None`."""
    if mode != TARGET_MODE:
        return None
    return TARGET_RATIOS.get((shared_key_dim, shared_value_dim, seq_len))


def target_status(mode, seq_len, shared_key_dim, shared_value_dim, ratio):
    """`"PASS"`/`"MISS"` where an issue sets a goal, else `None`."""
    target = target_ratio(mode, seq_len, shared_key_dim, shared_value_dim)
    if target is None:
        return None
    if ratio is None:
        return "MISS"
    return "PASS" if ratio <= target else "MISS"


def timed_points(config):
    """The collaborative layers' `(D̃, D̃_v)`, in the order they are timed:
    every D̃ of `shared_key_dims` with per-head values, then the `points`;
    a point given twice is timed once."""
    grid = [(dim, None) for dim in config["shared_key_dims"]]
    grid += [tuple(point) for point in config["points"]]
    return list(dict.fromkeys(grid))


# ---------------------------------------------------------------------------
# Measurement (runs in a process of one backend)
# ---------------------------------------------------------------------------


def resolve_config(args, backend, accelerator_kind):
    """What to measure, from the options, `--quick` and the device."""
    on_accelerator = accelerator_kind != "cpu"
    timing_key = (
        "quick" if args.quick else "accelerator" if on_accelerator else "cpu"
    )
    timing = dict(TIMING[timing_key])
    if args.budget_s is not None:
        timing["budget_s"] = args.budget_s
    if args.quick:
        default_seq_lens = (128,)
    elif on_accelerator:
        default_seq_lens = ACCELERATOR_SEQ_LENS
    else:
        default_seq_lens = CPU_SEQ_LENS
    shared_key_dims = args.shared_key_dims
    if shared_key_dims is None:
        shared_key_dims = (
            [TARGET_SHARED_KEY_DIM]
            if args.quick
            else list(FULL_SHARED_KEY_DIMS)
        )
    points = args.points
    if points is None:
        points = [list(point) for point in FULL_POINTS]
    grid = timed_points({"shared_key_dims": shared_key_dims, "points": points})
    if not grid:
        raise ValueError(
            "Nothing to time: --shared-key-dims and --points are both empty."
        )
    compiled_points = {
        "target": [p for p in grid if p[0] == TARGET_SHARED_KEY_DIM],
        "all": grid,
        "none": [],
    }[args.torch_compile]
    # Imported here: the backend must be chosen before Keras is imported.
    from benchmarks.workloads import attention_steps

    variants = list(attention_steps.VARIANTS[backend])
    if backend == "torch" and not compiled_points:
        variants.remove("compile")
    return {
        "model_dim": MODEL_DIM,
        "num_heads": NUM_HEADS,
        "key_dim": KEY_DIM,
        "value_dim": VALUE_DIM,
        "batch_size": args.batch_size or (2 if args.quick else 8),
        "seq_lens": list(args.seq_lens or default_seq_lens),
        "shared_key_dims": list(shared_key_dims),
        "points": [list(point) for point in points],
        "modes": list(attention_steps.MODES),
        "variants": variants,
        "torch_compile_points": [list(point) for point in compiled_points],
        "timing": timing,
        "memory": not args.no_memory,
        "memory_points": [
            [dim, None]
            for dim in (args.memory_shared_key_dims or shared_key_dims)
        ]
        + [list(point) for point in points],
        "deadline_s": args.deadline_s,
        "dtype": "float32",
    }


def main(args):
    start = time.perf_counter()
    # The memory probe runs in another process on the same accelerator: this
    # one must not reserve all of its memory up front, as JAX and TensorFlow
    # do by default.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    # Imported here: the backend must be chosen before Keras is imported.
    import keras

    backend = keras.backend.backend()
    accelerator = detect_accelerator(backend)
    config = resolve_config(args, backend, accelerator["kind"])
    run = start_run(SUITE, args, config, start, accelerator)
    deadline = _Deadline(start, config["deadline_s"])

    _measure_speed(run.document, config, backend, accelerator, deadline)
    if config["memory"]:
        from benchmarks.workloads import attention_steps

        attention_steps.release_cached_memory()
        _measure_memory(run.document, config, backend, accelerator)
    return run.finish(report)


class _Deadline:
    """Whether a time budget set with `--deadline-s` is spent."""

    def __init__(self, start, seconds):
        self._end = None if seconds is None else start + seconds

    def passed(self):
        return self._end is not None and time.perf_counter() > self._end


def _layer_name(shared_key_dim, shared_value_dim=None):
    if shared_key_dim is None:
        return "mha"
    if shared_value_dim is None:
        return f"collaborative_{shared_key_dim}"
    return f"collaborative_{shared_key_dim}_v{shared_value_dim}"


def _measure_speed(document, config, backend, accelerator, deadline):
    import keras

    from benchmarks.workloads import attention_steps

    on_accelerator = accelerator["kind"] != "cpu"
    for variant in config["variants"]:
        grid = timed_points(config)
        if variant == "compile":
            grid = [tuple(point) for point in config["torch_compile_points"]]
        for seq_len in config["seq_lens"]:
            keras.utils.set_random_seed(seq_len)
            inputs = keras.random.normal(
                (config["batch_size"], seq_len, MODEL_DIM)
            )
            layers = {
                _layer_name(*point): attention_steps.build_attention(
                    inputs, NUM_HEADS, KEY_DIM, *point
                )
                for point in [(None, None), *grid]
            }
            for mode in config["modes"]:
                where = {
                    "backend": backend,
                    "variant": variant,
                    "mode": mode,
                    "seq_len": seq_len,
                }
                if deadline.passed():
                    document["errors"].append(
                        {**where, "message": "skipped: --deadline-s reached"}
                    )
                    continue
                print(f"timing {where}", flush=True)
                if variant == "compile":
                    attention_steps.reset_torch_compile_cache()
                steps, compile_s = _compile_steps(
                    document, where, layers, inputs, on_accelerator
                )
                if "mha" not in steps:
                    continue
                stats = time_alternating(steps, **config["timing"])
                document["rows"].extend(
                    _speed_rows(
                        where, config, accelerator, grid, stats, compile_s
                    )
                )


def _compile_steps(document, where, layers, inputs, on_accelerator):
    """Makes and first-calls the steps of a group; records what fails.

    `torch.compile` in particular may fail on some layers; the group is then
    timed without them.
    """
    from benchmarks.workloads import attention_steps

    steps, compile_s = {}, {}
    for name, layer in layers.items():
        try:
            step = attention_steps.make_step(
                layer, inputs, where["mode"], where["variant"], on_accelerator
            )
            compile_s[name] = time_call(step)
            steps[name] = step
        except Exception as error:  # Recorded in the results, run goes on.
            document["errors"].append(
                {
                    **where,
                    "layer": name,
                    "message": f"{type(error).__name__}: {error}",
                }
            )
    return steps, compile_s


def _speed_rows(where, config, accelerator, grid, stats, compile_s):
    """One result row per collaborative layer, with MHA as the reference."""
    mha = stats["mha"]
    rows = []
    for dim, value_dim in grid:
        name = _layer_name(dim, value_dim)
        if name not in stats:
            continue
        collaborative = stats[name]
        ratio = collaborative.median_s / mha.median_s
        rows.append(
            {
                "kind": "speed",
                **where,
                "device": accelerator["kind"],
                "batch_size": config["batch_size"],
                "shared_key_dim": dim,
                "shared_value_dim": value_dim,
                "collaborative_ms": 1e3 * collaborative.median_s,
                "collaborative_p25_ms": 1e3 * collaborative.p25_s,
                "collaborative_p75_ms": 1e3 * collaborative.p75_s,
                "mha_ms": 1e3 * mha.median_s,
                "mha_p25_ms": 1e3 * mha.p25_s,
                "mha_p75_ms": 1e3 * mha.p75_s,
                "repeats": collaborative.repeats,
                "collaborative_first_call_s": compile_s[name],
                "mha_first_call_s": compile_s["mha"],
                "ratio": ratio,
                "flop_ratio": flop_ratio(where["seq_len"], dim, value_dim),
                "target_ratio": target_ratio(
                    where["mode"], where["seq_len"], dim, value_dim
                ),
                "status": target_status(
                    where["mode"], where["seq_len"], dim, value_dim, ratio
                ),
            }
        )
    return rows


def _measure_memory(document, config, backend, accelerator):
    """Runs the memory probe, in one process or one process per layer.

    A fresh process per layer is needed where the peak cannot be reset (see
    `benchmarks.harness.memory.PeakMemoryTracker`); otherwise one process
    measures them all.
    """
    tracker = PeakMemoryTracker(backend, accelerator["kind"])
    items = [
        {
            "seq_len": seq_len,
            "shared_key_dim": dim,
            "shared_value_dim": value_dim,
            "mode": MEMORY_MODE,
            "variant": config["variants"][0],
            "batch_size": config["batch_size"],
        }
        for seq_len in config["seq_lens"]
        for dim, value_dim in [(None, None), *config["memory_points"]]
    ]
    batches = [items] if tracker.resettable else [[item] for item in items]
    on_cpu = accelerator["kind"] == "cpu"
    environment = child_environment(
        backend, **(CPU_MEMORY_ENVIRONMENT if on_cpu else {})
    )
    for batch in batches:
        document["rows"].extend(_run_memory_probe(batch, environment, document))


def _run_memory_probe(items, environment, document):
    """Runs `benchmarks.suites.memory_probe` on `items`; returns its rows."""
    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "memory.json")
        command = [
            sys.executable,
            "-m",
            "benchmarks.suites.memory_probe",
            "--items",
            json.dumps(items),
            "--output",
            output,
        ]
        print(f"memory probe: {len(items)} layer(s)", flush=True)
        completed = subprocess.run(command, env=environment, check=False)
        if completed.returncode != 0 or not os.path.exists(output):
            document["errors"].append(
                {
                    "backend": environment["KERAS_BACKEND"],
                    "mode": MEMORY_MODE,
                    "message": "memory probe exited with status "
                    f"{completed.returncode} for {json.dumps(items)}",
                }
            )
            return []
        return read_json(output)["rows"]


# ---------------------------------------------------------------------------
# Report (no backend needed)
# ---------------------------------------------------------------------------


def report(document, output_dir, stem):
    """Writes the Markdown tables and the plot of a result document."""
    write_text(os.path.join(output_dir, f"{stem}.md"), _markdown(document))
    speed_rows = [row for row in document["rows"] if row["kind"] == "speed"]
    if speed_rows:
        _plot(speed_rows, os.path.join(output_dir, f"{stem}.png"))


def _markdown(document):
    rows = document["rows"]
    speed = [row for row in rows if row["kind"] == "speed"]
    memory = [row for row in rows if row["kind"] == "memory"]
    batch_sizes = sorted({row["batch_size"] for row in rows})
    quick = " (--quick)" if document["metadata"]["quick"] else ""
    parts = [
        f"# layer_speed: collaborative vs. Keras multi-head attention{quick}",
        "",
        f"Self-attention at BERT-base shape (D={MODEL_DIM}, H={NUM_HEADS}, "
        f"key_dim={KEY_DIM}), batch {', '.join(map(str, batch_sizes))}, no "
        "mask, float32. Times are medians of calls alternating between the "
        "layers of a group; ratio = collaborative / MHA; FLOP ratio = the "
        "same ratio for an ideal implementation (projections, scores, "
        "mixing, context). D̃_v: the shared value size, or per-head values.",
        "",
        environment_markdown(document),
        "## Goals (forward+backward)",
        "",
        _targets_table(speed),
        "## Speed",
        "",
        _speed_table(speed),
    ]
    if memory:
        parts += ["## Peak memory, forward+backward", "", _memory_table(memory)]
        parts.append(_MEMORY_NOTE)
    return "\n".join(parts) + errors_markdown(document)


_MEMORY_NOTE = """\
On a GPU/TPU, peak memory is the growth of the backend allocator's peak of
bytes in use during one compiled pass over what lived before it (weights and
input). On a CPU it is the growth of the process's peak resident set size
(Linux VmHWM, reset before the pass), measured in a separate process whose C
allocator returns freed memory to the system at once: it also counts thread
stacks and allocator slack, so compare layers, not absolute values. The XLA
column (JAX) is what XLA's buffer assignment reserves for the temporaries and
outputs of the compiled pass: exact, free of allocator noise.
"""


def _value_dim_cell(row):
    value_dim = row.get("shared_value_dim")
    return "per-head" if value_dim is None else value_dim


def _targets_table(speed_rows):
    rows = [
        (
            row["backend"],
            row["variant"],
            row["seq_len"],
            row["shared_key_dim"],
            _value_dim_cell(row),
            row["ratio"],
            f"≤ {row['target_ratio']}",
            row["status"],
        )
        for row in speed_rows
        if row["status"] is not None
    ]
    passed = sum(row[-1] == "PASS" for row in rows)
    return (
        markdown_table(
            [
                "backend",
                "variant",
                "T:",
                "D̃:",
                "D̃_v:",
                "ratio:",
                "target",
                "status",
            ],
            rows,
        )
        + f"\n{passed} of {len(rows)} target checks pass.\n"
    )


def _speed_table(speed_rows):
    rows = [
        (
            row["backend"],
            row["variant"],
            row["mode"],
            row["seq_len"],
            row["shared_key_dim"],
            _value_dim_cell(row),
            row["collaborative_ms"],
            row["mha_ms"],
            row["ratio"],
            row["flop_ratio"],
            row["repeats"],
            row["status"] or "",
        )
        for row in speed_rows
    ]
    return markdown_table(
        [
            "backend",
            "variant",
            "mode",
            "T:",
            "D̃:",
            "D̃_v:",
            "collaborative ms:",
            "MHA ms:",
            "ratio:",
            "FLOP ratio:",
            "repeats:",
            "target",
        ],
        rows,
    )


def _memory_table(memory_rows):
    mha_peaks = {
        (row["backend"], row["seq_len"]): row["peak_mib"]
        for row in memory_rows
        if row["shared_key_dim"] is None
    }
    rows = []
    for row in memory_rows:
        mha_peak = mha_peaks.get((row["backend"], row["seq_len"]))
        relative = (
            row["peak_mib"] / mha_peak
            if mha_peak and row["shared_key_dim"] is not None
            else None
        )
        rows.append(
            (
                row["backend"],
                row["variant"],
                row["seq_len"],
                "MHA" if row["shared_key_dim"] is None else "collaborative",
                row["shared_key_dim"],
                None if row["shared_key_dim"] is None else _value_dim_cell(row),
                row["peak_mib"],
                relative,
                row.get("xla_buffers_mib"),
            )
        )
    return markdown_table(
        [
            "backend",
            "variant",
            "T:",
            "layer",
            "D̃:",
            "D̃_v:",
            "peak MiB:",
            "vs. MHA:",
            "XLA buffers MiB:",
        ],
        rows,
    )


def _plot(speed_rows, path):
    """Measured and FLOP ratios against D̃, one panel per variant and mode."""
    panels = sorted({(row["backend"], row["variant"]) for row in speed_rows})
    modes = sorted({row["mode"] for row in speed_rows})
    seq_lens = sorted({row["seq_len"] for row in speed_rows})
    figure, axes = new_figure(len(modes), len(panels))
    for column, (backend, variant) in enumerate(panels):
        for line, mode in enumerate(modes):
            rows = [
                row
                for row in speed_rows
                if (row["backend"], row["variant"], row["mode"])
                == (backend, variant, mode)
            ]
            ax = axes[line][column]
            for index, seq_len in enumerate(seq_lens):
                _plot_seq_len(ax, rows, mode, seq_len, f"C{index}")
            _format_panel(ax, rows, f"{backend} {variant}, {mode}")
    figure.suptitle(
        "Time collaborative / MHA (solid: per-head values; squares: shared "
        "values, labelled D̃_v) and FLOP ratio (dashed); x marks a goal",
        fontsize=10,
    )
    save_figure(figure, path)


def _plot_seq_len(ax, rows, mode, seq_len, color):
    rows = [row for row in rows if row["seq_len"] == seq_len]
    for row in rows:
        if row.get("shared_value_dim") is not None:
            _plot_shared_values(ax, row, color)
    rows = sorted(
        (row for row in rows if row.get("shared_value_dim") is None),
        key=lambda row: row["shared_key_dim"],
    )
    _plot_goals(ax, mode, seq_len, color)
    if not rows:
        return
    dims = [row["shared_key_dim"] for row in rows]
    ax.plot(
        dims,
        [row["ratio"] for row in rows],
        "o-",
        color=color,
        label=f"T={seq_len}",
    )
    ax.plot(
        dims,
        [row["flop_ratio"] for row in rows],
        "_--",
        color=color,
        markersize=12,
    )


def _plot_shared_values(ax, row, color):
    ax.plot([row["shared_key_dim"]], [row["ratio"]], "s", color=color)
    ax.annotate(
        f"D̃_v={row['shared_value_dim']}",
        (row["shared_key_dim"], row["ratio"]),
        textcoords="offset points",
        xytext=(4, 4),
        fontsize=7,
        color=color,
    )


def _plot_goals(ax, mode, seq_len, color):
    for dim, value_dim, goal_seq_len in TARGET_RATIOS:
        goal = target_ratio(mode, seq_len, dim, value_dim)
        if goal_seq_len == seq_len and goal is not None:
            ax.plot([dim], [goal], "x", color=color, markersize=9)


def _format_panel(ax, rows, title):
    dims = sorted({row["shared_key_dim"] for row in rows})
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    label_dimensions(ax, dims)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("shared key size D̃")
    ax.set_ylabel("collaborative / MHA")
    ax.legend(fontsize=7)
