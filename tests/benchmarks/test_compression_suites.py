"""Reports and options of the conversion, fidelity and pruning suites."""

import argparse

import pytest

from benchmarks import common
from benchmarks import conversion
from benchmarks import fidelity
from benchmarks import pruning


def _document(module, suite, rows, **config):
    metadata = common.collect_metadata(suite, True, backend="jax")
    document = common.new_document(suite, metadata, {**module.QUICK, **config})
    document["rows"] = [{"backend": "jax", **row} for row in rows]
    return document


def _args(module, argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    module.add_arguments(parser)
    return module.resolve_config(parser.parse_args(argv))


def test_conversion_compares_structured_and_parafac(tmp_path):
    rows = []
    for layer, (structured_s, parafac_s) in enumerate([(0.1, 2.0), (0.2, 1.0)]):
        for method, seconds, error in (
            ("structured", structured_s, 0.40),
            ("parafac", parafac_s, 0.45),
            ("activation_aware", 0.3, 0.6),
        ):
            rows.append(
                {
                    "backend": "jax",
                    "model": conversion.MINILM,
                    "layer": layer,
                    "shared_key_dim": 96,
                    "method": method,
                    "seconds": seconds,
                    "iterations": 20,
                    "max_iter": 20,
                    "tol": 1e-6,
                    "converged": False,
                    "relative_error": error,
                    "weighted_error": 0.2,
                }
            )
    (comparison,) = conversion.compare(rows)
    assert comparison["speedup"] == pytest.approx(12.5)
    assert comparison["target"] == "PASS"
    rows[3]["relative_error"] = 0.5  # layer 1: structured worse than PARAFAC
    assert conversion.compare(rows)[0]["target"] == "MISS"
    rows[3]["relative_error"], rows[0]["seconds"] = 0.4, 1.0  # speedups 2x, 5x
    assert conversion.compare(rows)[0]["target"] == "MISS"
    conversion.report(
        _document(conversion, "conversion", rows), str(tmp_path), "c"
    )
    assert "| MISS |" in (tmp_path / "c.md").read_text()
    assert (tmp_path / "c.png").stat().st_size > 0
    config = _args(
        conversion, ["--quick", "--refine-dims", "", "--threads", "0"]
    )
    assert config["refine_dims"] == [] and config["threads"] is None


def test_fidelity_targets_and_report(tmp_path):
    def row(dim, method, mean, spearman=0.999):
        return {
            "shared_key_dim": dim,
            "method": method,
            "mean_cosine": mean,
            "min_cosine": mean - 0.01,
            "spearman_pairwise": spearman,
            "max_abs_difference": 0.1,
            "method_s": 1.0,
            "median_relative_error": 0.1,
        }

    rows = [
        row(96, "structured", 0.9),
        row(96, "refined", 0.995, 0.98),
        row(384, "activation_aware", 1.0),
    ]
    checks = {
        (c["method"], c["metric"]): c["result"]
        for c in fidelity.targets([{"backend": "jax", **r} for r in rows])
    }
    assert checks[("structured", "mean_cosine")] == "MISS"
    assert checks[("refined", "mean_cosine")] == "PASS"
    assert checks[("refined", "spearman_pairwise")] == "MISS"
    assert (
        checks[("activation_aware", "min_cosine")] == "MISS"
    )  # 0.99 < 0.99999
    fidelity.report(_document(fidelity, "fidelity", rows), str(tmp_path), "f")
    assert "0.995000 PASS" in (tmp_path / "f.md").read_text()
    assert (tmp_path / "f.png").stat().st_size > 0
    config = _args(fidelity, ["--methods", "distilled"])
    assert config["methods"] == ["activation_aware", "refined", "distilled"]


def test_pruning_report_marks_skipped_methods(tmp_path):
    rows = [
        {
            "shared_key_dim": 96,
            "method": "magnitude_tfmot",
            "budget_per_layer": 79584,
            "skipped": "not installed",
        },
        {
            "shared_key_dim": 96,
            "method": "low_rank",
            "budget_per_layer": 79584,
            "parameters_per_layer": 79207,
            "budget_ratio": 0.995,
            "mean_cosine": 0.9,
            "min_cosine": 0.8,
            "spearman_pairwise": 0.85,
            "max_abs_difference": 1.0,
            "ranks_per_head": [[9, 8]],
            "total_rank_per_layer": 103,
        },
    ]
    pruning.report(_document(pruning, "pruning", rows), str(tmp_path), "p")
    markdown = (tmp_path / "p.md").read_text()
    assert (
        "skipped: not installed" in markdown and "rank 8-9 per head" in markdown
    )
    assert (tmp_path / "p.png").stat().st_size > 0
