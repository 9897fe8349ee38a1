"""Report and options of the conversion suite."""

import pytest

from benchmarks.suites import conversion
from tests.benchmarks.suites.helpers import document_for
from tests.benchmarks.suites.helpers import resolved_config


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
        document_for(conversion, "conversion", rows), str(tmp_path), "c"
    )
    assert "| MISS |" in (tmp_path / "c.md").read_text()
    assert (tmp_path / "c.png").stat().st_size > 0
    config = resolved_config(
        conversion, ["--quick", "--refine-dims", "", "--threads", "0"]
    )
    assert config["refine_dims"] == [] and config["threads"] is None
