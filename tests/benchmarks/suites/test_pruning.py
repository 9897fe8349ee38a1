"""Report of the pruning suite."""

from benchmarks.suites import pruning
from tests.benchmarks.suites.helpers import document_for


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
    pruning.report(document_for(pruning, "pruning", rows), str(tmp_path), "p")
    markdown = (tmp_path / "p.md").read_text()
    assert (
        "skipped: not installed" in markdown and "rank 8-9 per head" in markdown
    )
    assert (tmp_path / "p.png").stat().st_size > 0
