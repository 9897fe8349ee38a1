"""Training from scratch at equal key/query budget (the paper's claim).

Trains a small causal Transformer (2 blocks, width 128, 8 heads with values
of size 16) for a fixed number of steps on character-level language
modelling of Python's standard library sources
(`benchmarks.workloads.stdlib_text`), once with concatenated heads (Keras
MHA, `key_dim = total / heads`) and once with collaborative heads
(`shared_key_dim = total`), for several total key/query sizes and seeds.
Cordonnier et al. find that collaborative heads keep the quality of
concatenated ones with a smaller total key size; the validation loss against
the total key size shows whether this miniature agrees.

Results: `training_<backend>.{json,md,png}`, or `training_all.*` for
`--backend-all`.
"""

import math
import os
import time

import numpy as np

from benchmarks.harness.markdown import environment_markdown
from benchmarks.harness.markdown import errors_markdown
from benchmarks.harness.markdown import markdown_table
from benchmarks.harness.options import config_with_options
from benchmarks.harness.plots import label_dimensions
from benchmarks.harness.plots import new_figure
from benchmarks.harness.plots import save_figure
from benchmarks.harness.result_files import write_text
from benchmarks.harness.run import start_run
from benchmarks.workloads import stdlib_text

SUITE = "training"
VARIANTS = ("concatenated", "collaborative")

# Full mode takes about 5 minutes per backend on 2 CPU cores; quick mode
# under a minute.
FULL = {
    "total_key_dims": [128, 64, 32, 16],
    "seeds": [0, 1],
    "steps": 200,
    "batch_size": 16,
    "seq_len": 64,
    "validation_windows": 256,
}
QUICK = {
    "total_key_dims": [64, 16],
    "seeds": [0],
    "steps": 20,
    "batch_size": 16,
    "seq_len": 64,
    "validation_windows": 64,
}
MODEL = {"width": 128, "depth": 2, "num_heads": 8, "value_dim": 16}
OPTIMIZER = {
    "learning_rate": 3e-3,
    "warmup_fraction": 0.1,
    "weight_decay": 0.01,
    "global_clipnorm": 1.0,
}


def add_arguments(parser):
    parser.add_argument(
        "--steps", type=int, default=None, help="Training steps per run."
    )
    parser.add_argument(
        "--seeds",
        type=lambda text: [int(seed) for seed in text.split(",")],
        default=None,
        help="Comma-separated seeds (default 0,1; 0 with --quick).",
    )
    parser.add_argument(
        "--total-key-dims",
        type=lambda text: [int(dim) for dim in text.split(",")],
        default=None,
        help="Comma-separated total key sizes (default 128,64,32,16).",
    )


def resolve_config(args):
    config = config_with_options(
        args, FULL, QUICK, ("steps", "seeds", "total_key_dims")
    )
    return {**config, "model": dict(MODEL), "optimizer": dict(OPTIMIZER)}


def main(args):
    start = time.perf_counter()
    config = resolve_config(args)
    corpus = stdlib_text.load_corpus()
    config["corpus"] = stdlib_text.corpus_description(corpus)
    run = start_run(SUITE, args, config, start)

    validation = stdlib_text.evenly_spaced_windows(
        corpus.validation, config["seq_len"], config["validation_windows"]
    )
    for seed in config["seeds"]:
        training = stdlib_text.random_windows(
            corpus.train,
            config["seq_len"],
            config["steps"] * config["batch_size"],
            seed,
        )
        for total_key_dim in config["total_key_dims"]:
            for variant in VARIANTS:
                row = _train_once(
                    config, variant, total_key_dim, seed, training, validation
                )
                run.document["rows"].append({"backend": run.backend, **row})
    return run.finish(report)


def _train_once(config, variant, total_key_dim, seed, training, validation):
    """Trains one model from scratch and evaluates it on validation text."""
    import keras

    from benchmarks.workloads import char_lm

    keras.utils.set_random_seed(seed)
    attention_factory = {
        "concatenated": char_lm.concatenated_attention,
        "collaborative": char_lm.collaborative_attention,
    }[variant]
    model = char_lm.build_language_model(
        attention_factory(
            MODEL["num_heads"], total_key_dim, value_dim=MODEL["value_dim"]
        ),
        config["seq_len"],
        stdlib_text.VOCABULARY_SIZE,
        width=MODEL["width"],
        depth=MODEL["depth"],
    )
    result = char_lm.train_and_evaluate(
        model,
        char_lm.warmup_cosine_adamw(config["steps"], **OPTIMIZER),
        training,
        validation,
        config["batch_size"],
    )
    print(
        f"{variant} total_key_dim={total_key_dim} seed={seed}: validation "
        f"loss {result['validation_loss']:.4f}, fit {result['fit_s']:.1f} s",
        flush=True,
    )
    return {
        "kind": "training",
        "variant": variant,
        "total_key_dim": total_key_dim,
        "seed": seed,
        **result,
    }


# ---------------------------------------------------------------------------
# Report (no backend needed)
# ---------------------------------------------------------------------------


def summarize(rows):
    """Mean and spread over seeds of each (backend, variant, total key dim).

    Returns:
        A list of dicts sorted by backend, total key size and variant, with
        the mean, min and max validation loss, the mean bits per character,
        the mean fit time and the number of seeds.
    """
    groups = {}
    for row in rows:
        key = (row["backend"], row["total_key_dim"], row["variant"])
        groups.setdefault(key, []).append(row)
    summary = []
    for (backend, total_key_dim, variant), group in sorted(
        groups.items(), key=lambda item: (item[0][0], -item[0][1], item[0][2])
    ):
        losses = np.array([row["validation_loss"] for row in group])
        summary.append(
            {
                "backend": backend,
                "total_key_dim": total_key_dim,
                "variant": variant,
                "validation_loss": float(losses.mean()),
                "validation_loss_min": float(losses.min()),
                "validation_loss_max": float(losses.max()),
                "validation_bpc": float(losses.mean()) / math.log(2),
                "fit_s": float(np.mean([row["fit_s"] for row in group])),
                "step_ms": _mean_or_none([row["step_ms"] for row in group]),
                "attention_parameters": group[0]["attention_parameters"],
                "seeds": len(group),
            }
        )
    return summary


def _mean_or_none(values):
    values = [value for value in values if value is not None]
    return float(np.mean(values)) if values else None


def report(document, output_dir, stem):
    """Writes the Markdown tables and the plot of a result document."""
    summary = summarize(document["rows"])
    write_text(
        os.path.join(output_dir, f"{stem}.md"), _markdown(document, summary)
    )
    if summary:
        _plot(summary, os.path.join(output_dir, f"{stem}.png"))


def _markdown(document, summary):
    # Every backend ran the same configuration.
    config = next(iter(document["config"].values()), FULL)
    quick = " (--quick)" if document["metadata"]["quick"] else ""
    corpus = config.get("corpus", {})
    parts = [
        f"# training: collaborative vs. concatenated heads{quick}",
        "",
        f"Character-level language model on Python {corpus.get('python')} "
        f"standard library sources ({corpus.get('train_files')} training "
        f"files, {corpus.get('validation_files')} validation files). "
        f"{MODEL['depth']} blocks, width {MODEL['width']}, "
        f"{MODEL['num_heads']} heads, value size {MODEL['value_dim']}; "
        f"{config['steps']} steps of {config['batch_size']} x "
        f"{config['seq_len']} characters; AdamW, peak learning rate "
        f"{OPTIMIZER['learning_rate']}. Validation loss in nats per "
        "character, mean over seeds (min-max in brackets); bpc = bits per "
        "character. Concatenated: Keras MHA with key_dim = total / heads. "
        "Collaborative: shared_key_dim = total, random mixing.",
        "",
        environment_markdown(document),
        "## Validation loss",
        "",
        _comparison_table(summary),
        "## Runs",
        "",
        _runs_table(document["rows"]),
    ]
    return "\n".join(parts) + errors_markdown(document)


def _comparison_table(summary):
    by_key = {
        (entry["backend"], entry["total_key_dim"], entry["variant"]): entry
        for entry in summary
    }
    rows = []
    for backend, total_key_dim in sorted(
        {key[:2] for key in by_key}, key=lambda key: (key[0], -key[1])
    ):
        concatenated = by_key.get((backend, total_key_dim, "concatenated"))
        collaborative = by_key.get((backend, total_key_dim, "collaborative"))
        rows.append(
            (
                backend,
                total_key_dim,
                _loss_cell(concatenated),
                _loss_cell(collaborative),
                _difference(collaborative, concatenated),
                _bpc_cell(concatenated),
                _bpc_cell(collaborative),
                _time_cell(concatenated),
                _time_cell(collaborative),
            )
        )
    return markdown_table(
        [
            "backend",
            "total key dim:",
            "concatenated loss:",
            "collaborative loss:",
            "collab. - concat.:",
            "concatenated bpc:",
            "collaborative bpc:",
            "concatenated fit s:",
            "collaborative fit s:",
        ],
        rows,
    )


def _loss_cell(entry):
    if entry is None:
        return None
    if entry["seeds"] == 1:
        return f"{entry['validation_loss']:.4f}"
    return (
        f"{entry['validation_loss']:.4f} "
        f"[{entry['validation_loss_min']:.4f}-"
        f"{entry['validation_loss_max']:.4f}]"
    )


def _bpc_cell(entry):
    return None if entry is None else f"{entry['validation_bpc']:.3f}"


def _time_cell(entry):
    return None if entry is None else f"{entry['fit_s']:.1f}"


def _difference(collaborative, concatenated):
    if collaborative is None or concatenated is None:
        return None
    difference = (
        collaborative["validation_loss"] - concatenated["validation_loss"]
    )
    return f"{difference:+.4f}"


def _runs_table(rows):
    return markdown_table(
        [
            "backend",
            "variant",
            "total key dim:",
            "seed:",
            "validation loss:",
            "bpc:",
            "fit s:",
            "ms/step:",
            "attention params:",
        ],
        [
            (
                row["backend"],
                row["variant"],
                row["total_key_dim"],
                row["seed"],
                f"{row['validation_loss']:.4f}",
                f"{row['validation_bpc']:.3f}",
                f"{row['fit_s']:.1f}",
                row["step_ms"],
                row["attention_parameters"],
            )
            for row in rows
        ],
    )


def _plot(summary, path):
    """Validation loss against total key size, one panel per backend."""
    backends = sorted({entry["backend"] for entry in summary})
    figure, axes = new_figure(1, len(backends))
    for ax, backend in zip(axes[0], backends):
        for variant, style in zip(VARIANTS, ("s--", "o-")):
            entries = sorted(
                (
                    entry
                    for entry in summary
                    if entry["backend"] == backend
                    and entry["variant"] == variant
                ),
                key=lambda entry: entry["total_key_dim"],
            )
            dims = [entry["total_key_dim"] for entry in entries]
            means = np.array([entry["validation_loss"] for entry in entries])
            spread = np.array(
                [
                    means - [entry["validation_loss_min"] for entry in entries],
                    [entry["validation_loss_max"] for entry in entries] - means,
                ]
            )
            ax.errorbar(
                dims, means, yerr=spread, fmt=style, capsize=3, label=variant
            )
        _format_panel(ax, summary, backend)
    figure.suptitle(
        "Validation loss vs. total key/query size (mean, min-max over seeds)",
        fontsize=10,
    )
    save_figure(figure, path)


def _format_panel(ax, summary, backend):
    dims = sorted({entry["total_key_dim"] for entry in summary})
    ax.set_xscale("log", base=2)
    label_dimensions(ax, dims)
    ax.set_title(backend, fontsize=9)
    ax.set_xlabel("total key/query size (H x key_dim, or D̃)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.legend(fontsize=8)
