import pytest

from benchmarks.harness.documents import new_document
from benchmarks.harness.metadata import collect_metadata
from benchmarks.suites import layer_speed


def test_flop_ratio_matches_the_issue():
    # The issue quotes about 0.73 at T=128 and 0.97 at T=512 for D̃=192.
    assert layer_speed.flop_ratio(128, 192) == pytest.approx(0.732, abs=1e-3)
    assert layer_speed.flop_ratio(512, 192) == pytest.approx(0.970, abs=1e-3)


def test_mha_flops_terms():
    flops = layer_speed.attention_flops(128)
    assert flops["query_key_projections"] == 4 * 128 * 768 * 768
    assert flops["mixing"] == 0
    assert flops["total"] == sum(
        value for key, value in flops.items() if key != "total"
    )


def test_full_size_collaborative_costs_more_than_mha():
    # Every head scores with all 768 shared dimensions instead of 64.
    assert layer_speed.flop_ratio(512, 768) > 1.0


@pytest.mark.parametrize(
    "seq_len, dim, ratio, expected",
    [
        (128, 192, 0.99, "PASS"),
        (128, 192, 1.01, "MISS"),
        (512, 192, 1.25, "PASS"),
        (512, 192, None, "MISS"),
        (512, 96, 2.0, None),
        (2048, 192, 2.0, None),
    ],
)
def test_target_status(seq_len, dim, ratio, expected):
    assert layer_speed.target_status(seq_len, dim, ratio) == expected


def _speed_row(backend, seq_len, dim, ratio):
    return {
        "kind": "speed",
        "backend": backend,
        "variant": "jit",
        "mode": "forward",
        "seq_len": seq_len,
        "batch_size": 2,
        "shared_key_dim": dim,
        "collaborative_ms": ratio,
        "mha_ms": 1.0,
        "ratio": ratio,
        "flop_ratio": layer_speed.flop_ratio(seq_len, dim),
        "repeats": 5,
        "target_ratio": layer_speed.TARGET_RATIOS.get(seq_len),
        "status": layer_speed.target_status(seq_len, dim, ratio),
    }


def test_report_writes_table_and_plot(tmp_path):
    metadata = collect_metadata("layer_speed", True, backend="jax")
    document = new_document("layer_speed", metadata, {})
    document["rows"] = [
        _speed_row("jax", 128, 192, 0.8),
        _speed_row("jax", 128, 96, 0.7),
        _speed_row("jax", 512, 192, 1.3),
        {
            "kind": "memory",
            "backend": "jax",
            "variant": "jit",
            "seq_len": 128,
            "batch_size": 2,
            "shared_key_dim": None,
            "peak_mib": 10.0,
        },
        {
            "kind": "memory",
            "backend": "jax",
            "variant": "jit",
            "seq_len": 128,
            "batch_size": 2,
            "shared_key_dim": 192,
            "peak_mib": 8.0,
        },
    ]
    layer_speed.report(document, str(tmp_path), "layer_speed_jax")
    markdown = (tmp_path / "layer_speed_jax.md").read_text()
    assert "PASS" in markdown and "MISS" in markdown
    assert "1 of 2 target checks pass" in markdown
    assert "0.8" in markdown  # memory relative to MHA
    assert (tmp_path / "layer_speed_jax.png").stat().st_size > 0
