import numpy as np
import pytest

from benchmarks.harness.documents import new_document
from benchmarks.harness.metadata import collect_metadata
from benchmarks.suites import training


def test_summarize_averages_seeds():
    rows = [
        {
            "backend": "jax",
            "variant": "collaborative",
            "total_key_dim": 16,
            "seed": seed,
            "validation_loss": loss,
            "fit_s": 1.0,
            "step_ms": None,
            "attention_parameters": 10,
        }
        for seed, loss in enumerate([2.0, 3.0])
    ]
    (entry,) = training.summarize(rows)
    assert entry["validation_loss"] == pytest.approx(2.5)
    assert entry["validation_loss_min"] == 2.0
    assert entry["validation_bpc"] == pytest.approx(2.5 / np.log(2))
    assert entry["seeds"] == 2
    assert entry["step_ms"] is None


def test_report_writes_table_and_plot(tmp_path):
    metadata = collect_metadata("training", True, backend="jax")
    document = new_document("training", metadata, training.QUICK)
    for variant, loss in zip(training.VARIANTS, (2.5, 2.4)):
        for dim in (64, 16):
            document["rows"].append(
                {
                    "backend": "jax",
                    "variant": variant,
                    "total_key_dim": dim,
                    "seed": 0,
                    "validation_loss": loss,
                    "validation_bpc": loss / np.log(2),
                    "fit_s": 1.0,
                    "step_ms": 10.0,
                    "attention_parameters": 100,
                }
            )
    training.report(document, str(tmp_path), "training_jax")
    markdown = (tmp_path / "training_jax.md").read_text()
    assert "-0.1000" in markdown
    assert (tmp_path / "training_jax.png").stat().st_size > 0
