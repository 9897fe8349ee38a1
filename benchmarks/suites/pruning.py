"""Pruning baselines at the key/query budget of collaborative attention.

Is collaborative conversion better than cheaper ways of shrinking the
query/key side of pretrained attention? At the parameter budget of the
collaborative layers at D̃ (`shared_key_dim`) = 48, 96 and 192,

    budget per layer = 2·D·D̃ (shared kernels) + D̃ (query bias)
                       + H·D̃ (mixing) + D·H (content bias),

each baseline is applied to a copy of the real all-MiniLM-L6-v2 and compared
on the held-out texts (mean/min cosine of mean-pooled embeddings, Spearman
of pairwise similarities, as the `fidelity` suite):

- `magnitude_keras`: magnitude pruning of every query and key kernel, one
  threshold per kernel, TFMOT's rule written with `keras.ops` (every backend);
- `magnitude_tfmot`: the same with TensorFlow Model Optimization itself
  (`prune_low_magnitude`, `ConstantSparsity`), run in a subprocess
  (`benchmarks/workloads/tfmot_prune.py`) because it needs `tf_keras`;
  skipped, with the reason recorded, when TFMOT is not installed;
- `low_rank`: per-head truncated SVD of each head's `W_Q^h W_K^hᵀ`;
- `collaborative` (activation-aware, the package's default with calibration
  data) and `collaborative_structured` (no calibration data, like the
  data-free baselines), recomputed here.

Results: `pruning_<backend>.{json,md,png}`.
"""

import dataclasses
import gc
import time

import numpy as np

from benchmarks.harness.markdown import environment_markdown
from benchmarks.harness.markdown import errors_markdown
from benchmarks.harness.markdown import markdown_table
from benchmarks.harness.options import add_threads_argument
from benchmarks.harness.options import config_with_options
from benchmarks.harness.options import integers
from benchmarks.harness.run import start_run
from benchmarks.harness.threads import limit_cpu_threads
from benchmarks.suites import minilm_report
from benchmarks.workloads import compression

SUITE = "pruning"
METHODS = (
    "collaborative",
    "collaborative_structured",
    "magnitude_keras",
    "magnitude_tfmot",
    "low_rank",
)

FULL = {
    "shared_key_dims": [48, 96, 192],
    "methods": list(METHODS),
    "tol": 1e-6,
    "max_iter": 300,
    "calibration_texts": 256,
    "held_out_texts": 128,
    "threads": 1,
}
QUICK = {
    **FULL,
    "shared_key_dims": [96],
    "max_iter": 50,
    "calibration_texts": 32,
    "held_out_texts": 64,
}


def add_arguments(parser):
    parser.add_argument(
        "--shared-key-dims",
        type=integers,
        help="Budgets as D̃ values, e.g. 48,96.",
    )
    parser.add_argument(
        "--methods",
        type=lambda text: [m for m in text.split(",") if m],
        help=f"Comma-separated subset of {','.join(METHODS)}.",
    )
    add_threads_argument(parser)


def resolve_config(args):
    config = config_with_options(
        args, FULL, QUICK, ("shared_key_dims", "methods", "threads")
    )
    unknown = set(config["methods"]) - set(METHODS)
    if unknown:
        raise SystemExit(
            f"Unknown methods {sorted(unknown)}; choose among {METHODS}."
        )
    if config["threads"] == 0:
        config["threads"] = None
    return config


def main(args):
    start = time.perf_counter()
    config = resolve_config(args)
    config["thread_pools"] = limit_cpu_threads(config["threads"])
    run = start_run(SUITE, args, config, start)
    bench = _prepare(config, run)
    methods = config["methods"]
    _collaborative_rows(bench, config)
    budgets = _magnitude_budgets(bench, config)
    keras_masks = {}
    if "magnitude_keras" in methods or "magnitude_tfmot" in methods:
        keras_masks = _magnitude_keras_rows(bench, budgets, methods)
    if "magnitude_tfmot" in methods:
        _magnitude_tfmot_rows(bench, config, budgets, keras_masks)
    if "low_rank" in methods:
        _low_rank_rows(bench, config)
    return run.finish(report)


@dataclasses.dataclass
class _Bench:
    """What every method needs: the loaded MiniLM, its shape, the original
    attention weights, the fidelity evaluator and the row recorder."""

    workbench: object
    evaluate: object
    originals: list
    model_dim: int
    num_heads: int
    key_dim: int
    run: object

    def budget(self, dim):
        """The collaborative layer's query/key parameters at D̃ = `dim`."""
        return compression.collaborative_qk_parameters(
            self.model_dim, self.num_heads, dim
        )

    def record(self, dim, method, fields):
        """Appends a result row and prints it."""
        budget = self.budget(dim)
        row = {
            "backend": self.run.backend,
            "shared_key_dim": dim,
            "method": method,
            "budget_per_layer": budget,
            **fields,
        }
        if row.get("parameters_per_layer") is not None:
            row["budget_ratio"] = row["parameters_per_layer"] / budget
        self.run.document["rows"].append(row)
        print(_progress_line(row), flush=True)


def _progress_line(row):
    where = f"D̃={row['shared_key_dim']} {row['method']}"
    if "mean_cosine" not in row:
        return f"{where}: skipped ({row.get('skipped')})"
    return (
        f"{where}: {row['parameters_per_layer']} params/layer "
        f"(budget {row['budget_per_layer']}), "
        f"mean cos {row['mean_cosine']:.6f}, "
        f"spearman {row['spearman_pairwise']:.5f}"
    )


def _prepare(config, run):
    """Loads MiniLM, runs the original on the held-out texts, and reads the
    original attention weights."""
    # Imported in main only, like Keras, which their functions call.
    from benchmarks.workloads import minilm

    workbench = minilm.load(
        config["calibration_texts"], config["held_out_texts"]
    )
    config["minilm"] = minilm.describe(workbench)
    shape = config["minilm"]
    config["original_qk_parameters_per_layer"] = compression.mha_qk_parameters(
        shape["model_dim"], shape["num_heads"], shape["key_dim"]
    )
    return _Bench(
        workbench=workbench,
        evaluate=minilm.evaluator(workbench.backbone, workbench.held_out),
        originals=[
            minilm.attention_weights(site.layer) for site in workbench.sites
        ],
        model_dim=shape["model_dim"],
        num_heads=shape["num_heads"],
        key_dim=shape["key_dim"],
        run=run,
    )


def _collaborative_rows(bench, config):
    """The collaborative points, recomputed with the package."""
    from benchmarks.workloads import minilm
    from keras_collab.conversion.calibration import collect_statistics

    workbench, methods = bench.workbench, config["methods"]
    statistics = None
    if "collaborative" in methods:
        statistics = collect_statistics(
            workbench.backbone, workbench.sites, workbench.calibration
        )
    for dim in config["shared_key_dims"]:
        for method, stats in (
            ("collaborative", statistics),
            ("collaborative_structured", None),
        ):
            if method not in methods:
                continue
            model, layers, seconds = minilm.convert(
                workbench.backbone,
                workbench.sites,
                dim,
                statistics=stats,
                tol=config["tol"],
                max_iter=config["max_iter"],
            )
            parameters = [c.qk_params_after for c in layers.values()]
            bench.record(
                dim,
                method,
                {
                    "parameters_per_layer": int(np.mean(parameters)),
                    "method_s": seconds,
                    **bench.evaluate(model),
                },
            )
            del model
            gc.collect()


def _magnitude_budgets(bench, config):
    """`{D̃: magnitude_budget}`, also recorded in the config."""
    budgets = {
        dim: compression.magnitude_budget(
            bench.model_dim, bench.num_heads, bench.key_dim, bench.budget(dim)
        )
        for dim in config["shared_key_dims"]
    }
    config["magnitude_budgets"] = {
        str(dim): budget for dim, budget in budgets.items()
    }
    return budgets


def _magnitude_keras_rows(bench, budgets, methods):
    """Computes the keras.ops magnitude masks at every budget, and records
    their rows when `magnitude_keras` runs.

    Returns:
        `{D̃: [{"query": mask, "key": mask} per layer]}`, which
        `magnitude_tfmot` is compared with.
    """
    import keras

    keras_masks = {}
    for dim, budget in budgets.items():
        began = time.perf_counter()
        keras_masks[dim] = [
            {
                role: keras.ops.convert_to_numpy(
                    compression.magnitude_mask(
                        weights[f"{role}_kernel"], budget["sparsity"]
                    )
                ).astype(bool)
                for role in ("query", "key")
            }
            for weights in bench.originals
        ]
        mask_s = time.perf_counter() - began
        if "magnitude_keras" in methods:
            bench.record(
                dim,
                "magnitude_keras",
                _masked_fields(bench, keras_masks[dim], budget, mask_s),
            )
    return keras_masks


def _magnitude_tfmot_rows(bench, config, budgets, keras_masks):
    """TFMOT's masks at every budget, from its subprocess, and their rows."""
    from benchmarks.workloads import tfmot_prune

    dims = list(budgets)
    tfmot_masks, info = tfmot_prune.run(
        bench.originals,
        bench.num_heads,
        bench.key_dim,
        [budgets[dim]["sparsity"] for dim in dims],
    )
    config["tfmot"] = info
    for index, dim in enumerate(dims):
        if tfmot_masks is None:
            bench.record(dim, "magnitude_tfmot", {"skipped": info["reason"]})
            continue
        masks = [layer[index] for layer in tfmot_masks]
        fields = _masked_fields(
            bench, masks, budgets[dim], info["seconds"] / len(dims)
        )
        fields["mask_entries_differing_from_keras_ops"] = _mismatches(
            masks, keras_masks[dim]
        )
        bench.record(dim, "magnitude_tfmot", fields)


def _mismatches(masks, reference):
    """How many query and key mask entries differ, over all layers."""
    return sum(
        int(np.sum(masks[layer][role] != reference[layer][role]))
        for layer in range(len(masks))
        for role in ("query", "key")
    )


def _low_rank_rows(bench, config):
    """Per-head truncated SVD at every budget."""
    for dim in config["shared_key_dims"]:
        total_rank = compression.low_rank_total_rank(
            bench.model_dim, bench.budget(dim)
        )
        began = time.perf_counter()
        copy, all_ranks = _truncated_copy(bench, total_rank)
        seconds = time.perf_counter() - began
        bench.record(
            dim,
            "low_rank",
            {
                "parameters_per_layer": compression.low_rank_parameters(
                    bench.model_dim, all_ranks[0]
                ),
                "ranks_per_head": all_ranks,
                "total_rank_per_layer": total_rank,
                "method_s": seconds,
                **bench.evaluate(copy),
            },
        )
        del copy
        gc.collect()


def _truncated_copy(bench, total_rank):
    """A copy of the backbone whose every layer keeps `total_rank` ranks.

    Returns:
        `(copy, ranks)`: the model, and the ranks per head of every layer.
    """
    from benchmarks.workloads import minilm

    copy = minilm.clone_backbone(bench.workbench.backbone)
    all_ranks = []
    for site, weights in zip(bench.workbench.sites, bench.originals):
        _, singular, _ = compression.head_product_svd(
            weights["query_kernel"], weights["key_kernel"]
        )
        ranks = compression.allocate_ranks(singular, total_rank)
        all_ranks.append(ranks.tolist())
        query, key, query_bias, key_bias = compression.truncate_heads(
            weights["query_kernel"],
            weights["key_kernel"],
            weights["query_bias"],
            ranks,
        )
        layer = _site_layer(copy, site.path)
        minilm.set_query_key(layer, query, key, query_bias, key_bias)
    return copy, all_ranks


def _site_layer(model, path):
    from keras_collab.conversion.sites import get_site

    return get_site(model, path).layer


def _masked_fields(bench, masks, budget, mask_s):
    """Applies magnitude masks to a copy of the backbone and evaluates it."""
    from benchmarks.workloads import minilm

    copy = minilm.clone_backbone(bench.workbench.backbone)
    nonzeros = []
    for site, weights, mask in zip(
        bench.workbench.sites, bench.originals, masks
    ):
        query = weights["query_kernel"] * mask["query"]
        key = weights["key_kernel"] * mask["key"]
        minilm.set_query_key(_site_layer(copy, site.path), query, key)
        nonzeros.append(int(mask["query"].sum() + mask["key"].sum()))
    fields = {
        "parameters_per_layer": int(np.mean(nonzeros))
        + bench.num_heads * bench.key_dim,
        "nonzeros_per_layer": nonzeros,
        "sparsity": budget["sparsity"],
        "kept_fraction": float(np.mean(nonzeros))
        / (2 * masks[0]["query"].size),
        "method_s": mask_s,
        **bench.evaluate(copy),
    }
    del copy
    gc.collect()
    return fields


# ---------------------------------------------------------------------------
# Report (no backend needed)
# ---------------------------------------------------------------------------


def report(document, output_dir, stem):
    minilm_report.write(document, output_dir, stem, METHODS, _markdown, _plot)


_METHOD_NOTES = {
    "collaborative": "convert_model(D̃, calibration_data), activation-aware",
    "collaborative_structured": "convert_model(D̃), no calibration",
    "magnitude_keras": (
        "magnitude pruning of W_Q, W_K (keras.ops, TFMOT's rule)"
    ),
    "magnitude_tfmot": (
        "magnitude pruning of W_Q, W_K (TFMOT prune_low_magnitude)"
    ),
    "low_rank": "per-head truncated SVD of W_Q^h W_K^hᵀ",
}


def _detail(row):
    if row["method"].startswith("magnitude"):
        text = f"kept {row['kept_fraction']:.1%} of kernel entries"
        if "mask_entries_differing_from_keras_ops" in row:
            differing = row["mask_entries_differing_from_keras_ops"]
            text += (
                "; masks = keras.ops"
                if differing == 0
                else f"; {differing} entries differ from keras.ops"
            )
        return text
    if row["method"] == "low_rank":
        ranks = sorted({r for layer in row["ranks_per_head"] for r in layer})
        span = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        total = row["total_rank_per_layer"]
        return f"rank {span} per head, Σ_h r_h = {total} per layer"
    return ""


def _markdown(document, rows):
    config = next(iter(document["config"].values()), FULL)
    quick = " (--quick)" if document["metadata"]["quick"] else ""
    minilm = config.get("minilm", {})
    parts = [
        f"# pruning: baselines at the collaborative key/query budget{quick}",
        "",
        _model_paragraph(minilm),
        "",
        _budget_paragraph(config.get("original_qk_parameters_per_layer")),
        "",
        *_method_lines(config, minilm),
        "",
        environment_markdown(document),
        "## Results",
        "",
        _results_table(rows),
        "",
        "What each method is: "
        + "; ".join(
            f"{method}: {note}" for method, note in _METHOD_NOTES.items()
        )
        + ".",
    ]
    return "\n".join(parts) + "\n" + errors_markdown(document)


def _model_paragraph(minilm):
    return (
        f"all-MiniLM-L6-v2 (D = {minilm.get('model_dim', 384)}, H = "
        f"{minilm.get('num_heads', 12)}, key_dim = "
        f"{minilm.get('key_dim', 32)}, {minilm.get('layers', 6)} layers); "
        "every method changes only the query/key side of every attention "
        "layer of a copy of the backbone. Fidelity on the held-out texts "
        f"{minilm.get('held_out_texts', '?')}, as in the `fidelity` suite."
    )


def _budget_paragraph(original):
    return (
        "Budget per layer at D̃ = the collaborative layer's query/key "
        "parameters: 2·D·D̃ + D̃ (query bias) + H·D̃ (mixing) + D·H (content "
        f"bias). The original layer has {original} (2·D·H·key_dim kernels + "
        "H·key_dim query bias). Key biases are never counted: they add the "
        "same value to all logits of a query, which softmax cancels."
    )


def _tfmot_sentence(tfmot):
    """How TFMOT ran: its versions and time, why it was skipped, or not."""
    if tfmot is None:
        return "TFMOT: not run."
    if "reason" in tfmot:
        return f"TFMOT: skipped, {tfmot['reason']}."
    versions = ", ".join(
        f"{k} {v}" for k, v in tfmot.get("versions", {}).items()
    )
    return f"TFMOT: {versions}; subprocess {tfmot['seconds']:.0f} s."


def _method_lines(config, minilm):
    """One Markdown bullet per kind of method."""
    return [
        "- magnitude_keras / magnitude_tfmot: the query and key kernels keep "
        "their largest-magnitude entries, one threshold per kernel, half of "
        "(budget - query bias) nonzeros each; biases unchanged. TFMOT's "
        "rule: k = round(size·(1 - sparsity)) in float32, keep |w| >= the "
        "k-th largest |w| (ties kept). " + _tfmot_sentence(config.get("tfmot")),
        "- low_rank: each head keeps the best rank-r_h approximation of "
        "W_Q^h W_K^hᵀ (SVD), split as (U S^{1/2})(V S^{1/2})ᵀ, written into "
        "the first r_h of the head's key_dim columns of the query and key "
        "kernels, the other columns zero (equivalent to a MultiHeadAttention "
        "with key_dim = r_h and sqrt(r_h/key_dim) folded into the query "
        "kernel: the scale 1/sqrt(key_dim) is kept). Σ_h r_h = "
        "floor(budget / (2·D + 1)), even across heads, the remainder to the "
        "heads with the largest next singular value. Query bias: least "
        "squares fit of the content term W_K^h b_Q^h; key bias zero.",
        "- collaborative: recomputed with `convert_model` (tol "
        f"{config['tol']}, max_iter {config['max_iter']}), activation-aware "
        f"on the calibration texts {minilm.get('calibration_texts', '?')}; "
        "collaborative_structured without calibration data (data-free, like "
        "the pruning baselines).",
    ]


def _results_table(rows):
    return markdown_table(
        [
            "backend",
            "D̃:",
            "method",
            "Q/K params / layer:",
            "/ budget:",
            "mean cos:",
            "min cos:",
            "Spearman:",
            "max abs diff:",
            "detail",
        ],
        [
            (
                r["backend"],
                r["shared_key_dim"],
                r["method"],
                r.get("parameters_per_layer"),
                (
                    None
                    if r.get("budget_ratio") is None
                    else f"{r['budget_ratio']:.3f}"
                ),
                *_fidelity_cells(r),
            )
            for r in rows
        ],
    )


def _fidelity_cells(row):
    """The fidelity columns and the detail of a row, or why it was skipped."""
    if "mean_cosine" not in row:
        return (None, None, None, None, f"skipped: {row.get('skipped')}")
    return (
        f"{row['mean_cosine']:.6f}",
        f"{row['min_cosine']:.6f}",
        f"{row['spearman_pairwise']:.5f}",
        row["max_abs_difference"],
        _detail(row),
    )


def _plot(rows, path):
    minilm_report.plot(
        rows,
        path,
        styles=dict(zip(METHODS, ("o-", "o--", "s-", "x:", "^-"))),
        xlabel="budget: D̃ of the collaborative layer",
        title="MiniLM held-out fidelity at equal key/query budget",
    )
