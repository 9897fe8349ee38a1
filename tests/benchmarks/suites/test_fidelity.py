"""Targets, report and options of the fidelity suite."""

from benchmarks.suites import fidelity
from tests.benchmarks.suites.helpers import document_for
from tests.benchmarks.suites.helpers import resolved_config


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
    fidelity.report(
        document_for(fidelity, "fidelity", rows), str(tmp_path), "f"
    )
    assert "0.995000 PASS" in (tmp_path / "f.md").read_text()
    assert (tmp_path / "f.png").stat().st_size > 0
    config = resolved_config(fidelity, ["--methods", "distilled"])
    assert config["methods"] == ["activation_aware", "refined", "distilled"]
