"""Quality of a converted decoder: a character GPT-2 against D̃.

No pretrained GPT-2 can be downloaded here, so the suite uses a small
GPT-2-style character language model, KerasHub's own `GPT2Backbone` and
`GPT2CausalLM`, trained on Python's standard library sources
(`benchmarks.workloads.char_gpt2`) and saved as a KerasHub preset. The
committed preset, `benchmarks/results/decoder_quality/char_gpt2_preset`, is
loaded when present and trained (12 minutes on 2 busy cores) otherwise, or
with `--retrain`; `--quick` trains a tiny one in a temporary folder.

The causal LM is converted with `convert_model(causal_lm, D̃,
calibration_data=...)` at D̃ = H·d_k / n for n in 1, 2, 4, 8 (at n = 1 the
conversion is exact), activation-aware on windows of the training split;
below full size, also with a distillation of the logits toward the
original's on the same windows (`distill_steps`). On windows of the test
files (held out from training, the loss curve and calibration) it reports:

- perplexity (per character) of the original and each converted model, and
  the mean KL divergence from the original's next-character distribution;
- top-1 agreement: the fraction of positions where the converted model's
  most likely next character is the original's (teacher-forced);
- greedy-continuation agreement: `generate()` with the greedy sampler (the
  converted models decode with the compact cache) continues prompts from
  the test files; the fraction of generated tokens equal to the original's
  at the same position, the mean fraction before the first difference, and
  the fraction of continuations identical throughout.

Shared values (`--value-divisors`): every D̃ is crossed with D̃_v =
H·d_v / n for each n given (`none`: per-head values, the default), converted
with `shared_value_dim=D̃_v`; the distillation then trains the value side
too. The rows also give the value/output parameters and the compact cache
per token (D̃ + H content logits + D̃_v, or H·d_v) with the values' share.

Results: `decoder_quality_<backend>.{json,md,png}` in the output folder;
the committed full run is in `benchmarks/results/decoder_quality/` (see
benchmarks/README.md for its command).
"""

import itertools
import math
import os
import tempfile
import time

import numpy as np

from benchmarks.harness.markdown import environment_markdown
from benchmarks.harness.markdown import errors_markdown
from benchmarks.harness.markdown import markdown_table
from benchmarks.harness.options import add_threads_argument
from benchmarks.harness.options import config_with_options
from benchmarks.harness.options import integers
from benchmarks.harness.options import integers_or_none
from benchmarks.harness.plots import label_dimensions
from benchmarks.harness.plots import new_figure
from benchmarks.harness.plots import save_figure
from benchmarks.harness.result_files import RESULTS_DIR
from benchmarks.harness.result_files import write_text
from benchmarks.harness.run import start_run
from benchmarks.harness.threads import limit_cpu_threads
from benchmarks.workloads import compression

SUITE = "decoder_quality"
METHODS = ("activation_aware", "distilled")
DEFAULT_PRESET = RESULTS_DIR / "decoder_quality" / "char_gpt2_preset"

FULL = {
    "preset": str(DEFAULT_PRESET),
    # Used when the preset is (re)trained.
    "model": {
        "num_layers": 2,
        "num_heads": 4,
        "hidden_dim": 128,
        "intermediate_dim": 512,
    },
    "training": {
        "steps": 2000,
        "eval_every": 200,
        "batch_size": 32,
        "sequence_length": 128,
        "validation_windows": 128,
        "learning_rate": 3e-3,
        "warmup_fraction": 0.05,
        "weight_decay": 0.01,
        "global_clipnorm": 1.0,
        "seed": 0,
    },
    # D̃ = H·d_k / divisor.
    "divisors": [1, 2, 4, 8],
    # D̃_v = H·d_v / divisor, crossed with every D̃; None: per-head values.
    "value_divisors": [None],
    "calibration_windows": 256,
    "calibration_batch_size": 16,
    "calibration_seed": 1,
    "distill_steps": 150,
    "distill_learning_rate": 3e-4,
    "held_out_windows": 256,
    "continuations": 32,
    "prompt_length": 64,
    "continuation_length": 32,
    "threads": 0,
}
QUICK = {
    **FULL,
    "preset": None,
    "model": {
        "num_layers": 2,
        "num_heads": 2,
        "hidden_dim": 16,
        "intermediate_dim": 32,
    },
    "training": {
        **FULL["training"],
        "steps": 20,
        "eval_every": 10,
        "batch_size": 8,
        "sequence_length": 32,
        "validation_windows": 8,
        "learning_rate": 1e-2,
        "warmup_fraction": 0.1,
    },
    "divisors": [1, 2],
    "calibration_windows": 16,
    "calibration_batch_size": 8,
    "distill_steps": 4,
    "held_out_windows": 16,
    "continuations": 4,
    "prompt_length": 8,
    "continuation_length": 8,
}


def add_arguments(parser):
    parser.add_argument(
        "--preset",
        help="Character GPT-2 preset folder: loaded if present, else "
        "trained there (default: benchmarks/results/decoder_quality/"
        "char_gpt2_preset; --quick: a temporary folder).",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="Train the preset anew, replacing it.",
    )
    parser.add_argument(
        "--divisors",
        type=integers,
        help="D̃ = H·d_k / divisor for each (default 1,2,4,8).",
    )
    parser.add_argument(
        "--value-divisors",
        type=integers_or_none,
        help="Shared values: D̃_v = H·d_v / divisor for each, crossed with "
        "every D̃, e.g. none,2,4 ('none': per-head values; the default).",
    )
    parser.add_argument(
        "--distill-steps",
        type=int,
        help="Distillation steps below full size (default 150; 0: none).",
    )
    parser.add_argument("--distill-learning-rate", type=float)
    parser.add_argument(
        "--steps", type=int, help="Training steps, when training (2000)."
    )
    add_threads_argument(parser)


_OPTIONS = (
    "preset",
    "divisors",
    "value_divisors",
    "distill_steps",
    "distill_learning_rate",
    "threads",
)


def resolve_config(args):
    config = config_with_options(args, FULL, QUICK, _OPTIONS)
    config["model"] = dict(config["model"])
    config["training"] = dict(config["training"])
    if getattr(args, "steps", None) is not None:
        config["training"]["steps"] = args.steps
    config["retrain"] = bool(getattr(args, "retrain", False))
    if not config["value_divisors"]:
        raise SystemExit(
            "--value-divisors is empty; 'none' keeps per-head values."
        )
    if config["threads"] == 0:
        config["threads"] = None
    return config


def main(args):
    start = time.perf_counter()
    config = resolve_config(args)
    config["thread_pools"] = limit_cpu_threads(config["threads"])
    run = start_run(SUITE, args, config, start)
    import keras_collab

    # Where the package measured was imported from (a checkout, an export).
    config["keras_collab_path"] = os.path.dirname(keras_collab.__file__)
    with tempfile.TemporaryDirectory() as scratch:
        bench = _prepare(config, scratch)
        for row in _rows(config, bench):
            run.document["rows"].append({"backend": run.backend, **row})
            print(_progress_line(row), flush=True)
            run.save()
    return run.finish(report)


class _Bench:
    """The original model and the text it is evaluated on."""

    def __init__(self, causal_lm, calibration, held_out, prompts):
        self.causal_lm = causal_lm
        self.calibration = calibration
        self.held_out = held_out
        self.prompts = prompts


def _prepare(config, scratch):
    """Loads or trains the preset, and cuts the calibration windows, the
    held-out windows and the prompts."""
    from benchmarks.workloads import char_gpt2

    splits = char_gpt2.load_splits()
    config["text"] = splits.describe()
    preset = config["preset"] or os.path.join(scratch, "char_gpt2_preset")
    began = time.perf_counter()
    if config["retrain"] or not os.path.isdir(preset):
        print(f"Training the character GPT-2 into {preset}", flush=True)
        char_gpt2.make_preset(
            preset,
            config["model"],
            config["training"],
            splits,
            force=config["retrain"],
        )
        config["trained_now"] = True
    else:
        config["trained_now"] = False
    causal_lm, record = char_gpt2.load_preset(preset)
    config["preset_load_s"] = round(time.perf_counter() - began, 1)
    config["preset_record"] = record
    backbone = causal_lm.backbone
    config["original"] = {
        "num_layers": backbone.num_layers,
        "num_heads": backbone.num_heads,
        "hidden_dim": backbone.hidden_dim,
        "head_dim": backbone.hidden_dim // backbone.num_heads,
        "max_sequence_length": backbone.max_sequence_length,
        "parameters": causal_lm.count_params(),
    }
    length = backbone.max_sequence_length
    calibration, _ = char_gpt2.random_windows(
        splits.train,
        length,
        config["calibration_windows"],
        config["calibration_seed"],
    )
    held_out = char_gpt2.evenly_spaced_windows(
        splits.test, length, config["held_out_windows"]
    )
    if 1 + config["prompt_length"] + config["continuation_length"] > length:
        raise SystemExit(
            "prompt_length + continuation_length + 1 exceeds the model's "
            f"max_sequence_length {length}."
        )
    prompt_windows, _ = char_gpt2.evenly_spaced_windows(
        splits.test, config["prompt_length"] + 1, config["continuations"]
    )
    prompts = prompt_windows["token_ids"][:, 1:]
    return _Bench(
        causal_lm,
        char_gpt2.batches_of(calibration, config["calibration_batch_size"]),
        held_out,
        prompts,
    )


def _rows(config, bench):
    """The original's row, then one per D̃ and method."""
    from benchmarks.workloads import char_gpt2

    inputs, targets = bench.held_out
    began = time.perf_counter()
    reference = char_gpt2.logits_of(bench.causal_lm, inputs)
    reference_nll = char_gpt2.mean_negative_log_likelihood(reference, targets)
    reference_continuations = char_gpt2.greedy_continuations(
        bench.causal_lm, bench.prompts, config["continuation_length"]
    )
    config["reference_continuations"] = reference_continuations.tolist()
    full = config["original"]["num_heads"] * config["original"]["head_dim"]
    yield {
        "shared_key_dim": full,
        "shared_value_dim": None,
        "method": "original",
        "nll": reference_nll,
        "perplexity": math.exp(reference_nll),
        "evaluation_s": round(time.perf_counter() - began, 1),
    }
    measure = _Measure(reference, reference_nll, reference_continuations)
    # GPT-2's value heads are as wide as its key heads.
    for point in grid(config, full, full):
        yield _converted(config, bench, measure, point, 0)
        exact = point["shared_key_dim"] == full and point[
            "shared_value_dim"
        ] in (None, full)
        if config["distill_steps"] and not exact:
            yield _converted(
                config, bench, measure, point, config["distill_steps"]
            )


def grid(config, full_key, full_value):
    """The (D̃, D̃_v) points, every D̃ crossed with every D̃_v, from the
    divisors of H·d_k and H·d_v (`None`: per-head values)."""
    points = []
    for divisor in config["divisors"]:
        key = _divided(full_key, divisor, "H·d_k")
        for value_divisor in config["value_divisors"]:
            value = None
            if value_divisor is not None:
                value = _divided(full_value, value_divisor, "H·d_v")
            points.append({"shared_key_dim": key, "shared_value_dim": value})
    return points


def _divided(full, divisor, name):
    if full % divisor:
        raise SystemExit(f"{name} = {full} is not divisible by {divisor}.")
    return full // divisor


class _Measure:
    """Compares a converted causal LM with the original's outputs."""

    def __init__(self, logits, nll, continuations):
        self.logits = logits
        self.nll = nll
        self.continuations = continuations
        self.log_probabilities = _log_softmax(logits)

    def __call__(self, causal_lm, bench, config):
        from benchmarks.workloads import char_gpt2

        inputs, targets = bench.held_out
        logits = char_gpt2.logits_of(causal_lm, inputs)
        nll = char_gpt2.mean_negative_log_likelihood(logits, targets)
        log_probabilities = _log_softmax(logits)
        kl = (
            np.exp(self.log_probabilities)
            * (self.log_probabilities - log_probabilities)
        ).sum(axis=-1)
        continuations = char_gpt2.greedy_continuations(
            causal_lm, bench.prompts, config["continuation_length"]
        )
        return {
            "nll": nll,
            "perplexity": math.exp(nll),
            "perplexity_ratio": math.exp(nll - self.nll),
            "mean_kl": float(kl.mean()),
            "top1_agreement": float(
                (logits.argmax(-1) == self.logits.argmax(-1)).mean()
            ),
            "max_abs_logit_difference": float(
                np.abs(logits - self.logits).max()
            ),
            **char_gpt2.agreement(self.continuations, continuations),
            "continuations": continuations.tolist(),
        }


def _log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _converted(config, bench, measure, point, distill_steps):
    """Converts the original at one (D̃, D̃_v) point, with or without
    distillation."""
    import keras_collab

    began = time.perf_counter()
    result = keras_collab.convert_model(
        bench.causal_lm,
        point["shared_key_dim"],
        shared_value_dim=point["shared_value_dim"],
        calibration_data=bench.calibration,
        distill_steps=distill_steps,
        distill_learning_rate=config["distill_learning_rate"],
    )
    conversion_s = time.perf_counter() - began
    began = time.perf_counter()
    measured = measure(result.model, bench, config)
    conversions = list(result.layers.values())
    errors = [c.relative_error for c in conversions]
    value_errors = [
        c.value_relative_error
        for c in conversions
        if c.value_relative_error is not None
    ]
    row = {
        **point,
        "method": "distilled" if distill_steps else "activation_aware",
        **measured,
        "median_relative_error": float(np.median(errors)),
        "median_value_relative_error": (
            float(np.median(value_errors)) if value_errors else None
        ),
        "qk_params_before": int(result.qk_params_before),
        "qk_params_after": int(result.qk_params_after),
        "vo_params_before": int(sum(c.vo_params_before for c in conversions)),
        "vo_params_after": int(sum(c.vo_params_after for c in conversions)),
        "parameters": int(result.model.count_params()),
        **compression.decode_cache([c.layer for c in conversions]),
        "conversion_s": round(conversion_s, 1),
        "evaluation_s": round(time.perf_counter() - began, 1),
    }
    if distill_steps:
        row["distillation"] = result.distillation
    return row


def _progress_line(row):
    values = row.get("shared_value_dim")
    values = "" if values is None else f"/D̃_v={values}"
    line = (
        f"D̃={row['shared_key_dim']}{values} {row['method']}: perplexity "
        f"{row['perplexity']:.4f}"
    )
    if row["method"] == "original":
        return line
    return (
        f"{line} (x{row['perplexity_ratio']:.4f}), top-1 "
        f"{row['top1_agreement']:.4f}, greedy tokens "
        f"{row['token_agreement']:.4f}, prefix {row['prefix_agreement']:.4f}"
        f" ({row['conversion_s']:.1f} s + {row['evaluation_s']:.1f} s)"
    )


# ---------------------------------------------------------------------------
# Report (no backend needed)
# ---------------------------------------------------------------------------


def report(document, output_dir, stem):
    write_text(os.path.join(output_dir, f"{stem}.md"), _markdown(document))
    if document["rows"]:
        _plot(document, os.path.join(output_dir, f"{stem}.png"))


def _first_config(document):
    return next(iter(document["config"].values()), FULL)


def _markdown(document):
    config = _first_config(document)
    quick = " (--quick)" if document["metadata"]["quick"] else ""
    parts = [
        "# decoder_quality: converted character GPT-2 vs. the original" + quick,
        "",
        _model_paragraph(config),
        "",
        _method_paragraph(config),
        "",
        environment_markdown(document),
        "## Training of the original",
        "",
        _training_table(config.get("preset_record", {})),
        "## Results on held-out text",
        "",
        _results_table(document["rows"]),
        "",
        _RESULTS_NOTE,
    ]
    return "\n".join(parts) + "\n" + errors_markdown(document)


def _model_paragraph(config):
    original = config.get("original", {})
    record = config.get("preset_record", {})
    training = record.get("training", {})
    text = config.get("text", {})
    trained = (
        f"{training.get('steps')} AdamW steps of {training.get('batch_size')}"
        f" windows of {training.get('sequence_length')} characters (peak "
        f"learning rate {training.get('learning_rate')}, warm-up then cosine "
        f"decay), {record.get('fit_s')} s"
        if training
        else "unknown training"
    )
    preset = config.get("preset") or "a temporary folder"
    return (
        f"Original: KerasHub `GPT2CausalLM`, {original.get('num_layers')} "
        f"layers, {original.get('num_heads')} heads of d_k = "
        f"{original.get('head_dim')}, hidden size "
        f"{original.get('hidden_dim')}, context "
        f"{original.get('max_sequence_length')}, "
        f"{original.get('parameters')} parameters, one token per character "
        f"(byte-level `GPT2Tokenizer`), trained from scratch on Python "
        f"standard library sources ({text.get('train_files')} training "
        f"files): {trained}. Preset: `{_relative(preset)}` "
        f"({_megabytes(record.get('preset_bytes'))}; "
        f"{'trained by this run' if config.get('trained_now') else 'loaded'}"
        ")."
    )


def _relative(path):
    try:
        return os.path.relpath(path, RESULTS_DIR.parents[1])
    except ValueError:
        return path


def _megabytes(size):
    return "size unknown" if size is None else f"{size / 2**20:.1f} MiB"


def _method_paragraph(config):
    text = config.get("text", {})
    return (
        "Conversion: `keras_collab.convert_model(causal_lm, D̃, "
        "calibration_data=...)`, activation-aware on "
        f"{config['calibration_windows']} random windows of the training "
        f"files (batches of {config['calibration_batch_size']}); distilled: "
        f"the same with `distill_steps={config['distill_steps']}` "
        f"(learning rate {config['distill_learning_rate']}; MSE of the "
        "logits, only the collaborative query/key weights trained, and the "
        "value/output weights where values are shared). "
        f"{_values_sentence(config)}"
        f"Held out: {text.get('test_files')} test files "
        f"({text.get('test_chars')} characters), seen by neither training, "
        f"its loss curve nor calibration: {config['held_out_windows']} "
        "evenly spaced windows for perplexity, KL and top-1 agreement, and "
        f"{config['continuations']} prompts of {config['prompt_length']} "
        f"characters continued greedily for {config['continuation_length']}"
        " characters by `generate()` (greedy sampler; converted models use "
        "the compact cache)."
    )


def _values_sentence(config):
    divisors = config.get("value_divisors", [None])
    if divisors == [None]:
        return ""
    named = ", ".join(
        "per-head values" if d is None else f"H·d_v/{d}" for d in divisors
    )
    return (
        f"Shared values: every D̃ crossed with D̃_v in {named} "
        "(`shared_value_dim`). "
    )


def _training_table(record):
    points = record.get("points")
    if not points:
        return "No training record.\n"
    return markdown_table(
        ["step:", "train loss:", "validation loss:", "validation bpc:", "s:"],
        [
            (
                p["step"],
                f"{p['train_loss']:.4f}",
                f"{p['validation_loss']:.4f}",
                f"{p['validation_loss'] / math.log(2):.3f}",
                f"{p['seconds']:.0f}",
            )
            for p in points
        ],
    )


def _results_table(rows):
    return markdown_table(
        [
            "backend",
            "D̃:",
            "D̃_v:",
            "method",
            "perplexity:",
            "× original:",
            "mean KL:",
            "top-1 agree:",
            "greedy tokens:",
            "greedy prefix:",
            "identical:",
            "QK params:",
            "VO params:",
            "cache / token:",
            "value share:",
            "conversion s:",
        ],
        [
            (
                r["backend"],
                r["shared_key_dim"],
                _value_cell(r),
                r["method"],
                f"{r['perplexity']:.4f}",
                _cell(r, "perplexity_ratio", "{:.4f}"),
                _cell(r, "mean_kl", "{:.2e}"),
                _cell(r, "top1_agreement", "{:.4f}"),
                _cell(r, "token_agreement", "{:.4f}"),
                _cell(r, "prefix_agreement", "{:.4f}"),
                _cell(r, "identical", "{:.3f}"),
                _cell(r, "qk_params_after", "{:,}"),
                _cell(r, "vo_params_after", "{:,}"),
                _cell(r, "cache_per_token", "{:,}"),
                _cell(r, "value_cache_share", "{:.3f}"),
                _cell(r, "conversion_s", "{:.1f}"),
            )
            for r in rows
        ],
    )


def _value_cell(row):
    value = row.get("shared_value_dim")
    return "per head" if value is None else value


def _cell(row, key, form):
    value = row.get(key)
    return None if value is None else form.format(value)


_RESULTS_NOTE = (
    '"perplexity": exp of the mean negative log-likelihood per character '
    'on the held-out windows; "× original": its ratio to the original\'s. '
    '"mean KL": KL(original ‖ converted) of the next-character '
    'distributions, nats, mean over positions. "top-1 agree": teacher-'
    'forced argmax agreement. "greedy tokens": fraction of generated '
    "characters equal to the original's at the same position; \"greedy "
    'prefix": mean fraction of a continuation before its first difference; '
    '"identical": continuations identical throughout. "QK params": query/'
    'key parameters of the converted attention layers, "VO params" their '
    'value/output parameters. "cache / token": numbers the compact decode '
    "cache keeps per token over all layers (D̃ + H content logits below "
    "full D̃ + D̃_v, or H·d_v with per-head values; KerasHub's cache keeps "
    '2·H·d_k per layer); "value share": the values\' fraction of it. '
    '"conversion s": `convert_model` (calibration pass, decomposition, '
    "distillation)."
)


def _plot(document, path):
    rows = document["rows"]
    record = _first_config(document).get("preset_record", {})
    figure, axes = new_figure(1, 3)
    _plot_training(axes[0][0], record.get("points") or [])
    backends = sorted({r["backend"] for r in rows})
    dims = sorted(
        {r["shared_key_dim"] for r in rows if r["method"] != "original"}
    )
    # Per-head values first, then shared values by size.
    value_dims = sorted(
        {r.get("shared_value_dim") for r in rows},
        key=lambda d: (d is not None, d or 0),
    )
    for backend in backends:
        mine = [r for r in rows if r["backend"] == backend]
        original = next((r for r in mine if r["method"] == "original"), None)
        for (method, style), (index, value_dim) in itertools.product(
            zip(METHODS, ("o-", "D--")), enumerate(value_dims)
        ):
            points = sorted(
                (
                    r
                    for r in mine
                    if r["method"] == method
                    and r.get("shared_value_dim") == value_dim
                ),
                key=lambda r: r["shared_key_dim"],
            )
            if not points:
                continue
            x = [r["shared_key_dim"] for r in points]
            label = f"{method}{_value_label(value_dims, value_dim)} ({backend})"
            for ax, key in zip(axes[0][1:], ("perplexity", "token_agreement")):
                ax.plot(
                    x,
                    [r[key] for r in points],
                    style,
                    color=f"C{index % 10}",
                    label=label,
                )
        if original is not None:
            axes[0][1].axhline(
                original["perplexity"],
                color="k",
                lw=0.8,
                ls=":",
                label=f"original ({backend})",
            )
    for ax, ylabel in zip(
        axes[0][1:], ("held-out perplexity", "greedy token agreement")
    ):
        if dims:
            ax.set_xscale("log", base=2)
            label_dimensions(ax, dims)
        ax.set_xlabel("D̃ (shared_key_dim)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    title = "Converted character GPT-2 vs. D̃"
    if value_dims != [None]:
        title += " and D̃_v (colours)"
    figure.suptitle(title, fontsize=10)
    save_figure(figure, path)


def _value_label(value_dims, value_dim):
    """The D̃_v part of a legend entry, where shared values were run."""
    if value_dims == [None]:
        return ""
    return ", per-head values" if value_dim is None else f", D̃_v={value_dim}"


def _plot_training(ax, points):
    if points:
        steps = [p["step"] for p in points]
        ax.plot(steps, [p["train_loss"] for p in points], "o-", label="train")
        ax.plot(
            steps,
            [p["validation_loss"] for p in points],
            "s-",
            label="validation",
        )
        ax.legend(fontsize=7)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title("training of the original", fontsize=9)
