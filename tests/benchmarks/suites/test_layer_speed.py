import argparse

import keras
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


def test_shared_values_flops_from_the_equations():
    # Ṽ = X W̃_V (T·D·D̃_v), context_h = A_h Ṽ (H·T²·D̃_v), the value mixing
    # (H·T·D̃_v) and W̃_O (T·D̃_v·D), 2 FLOPs per multiply-add.
    seq_len, dim, value_dim = 256, 192, 96
    flops = layer_speed.attention_flops(seq_len, dim, value_dim)
    assert flops["value_projection"] == 2 * seq_len * 768 * value_dim
    assert flops["output_projection"] == 2 * seq_len * value_dim * 768
    assert flops["context"] == 2 * 12 * seq_len**2 * value_dim
    assert flops["mixing"] == 2 * 12 * seq_len * (dim + value_dim)
    per_head = layer_speed.attention_flops(seq_len, dim)
    assert per_head["value_projection"] == 2 * seq_len * 768 * 768
    assert per_head["context"] == 2 * 12 * seq_len**2 * 64


def test_shared_values_at_full_value_size_cost_more_context_flops():
    # Every head sums all D̃_v = 768 shared value dimensions instead of 64.
    assert layer_speed.flop_ratio(512, 192, 768) > layer_speed.flop_ratio(
        512, 192
    )
    assert layer_speed.flop_ratio(512, 192, 192) < 1.0


@pytest.mark.parametrize(
    "mode, seq_len, dim, value_dim, ratio, expected",
    [
        ("forward_backward", 128, 192, None, 0.80, "PASS"),
        ("forward_backward", 128, 192, None, 0.81, "MISS"),
        ("forward_backward", 512, 192, None, 1.05, "PASS"),
        ("forward_backward", 512, 192, None, None, "MISS"),
        ("forward_backward", 512, 192, 192, 0.99, "PASS"),
        ("forward_backward", 512, 192, 192, 1.01, "MISS"),
        ("forward_backward", 128, 192, 192, 2.0, None),
        ("forward", 128, 192, None, 2.0, None),
        ("forward_backward", 512, 96, None, 2.0, None),
        ("forward_backward", 2048, 192, None, 2.0, None),
    ],
)
def test_target_status(mode, seq_len, dim, value_dim, ratio, expected):
    status = layer_speed.target_status(mode, seq_len, dim, value_dim, ratio)
    assert status == expected


def test_points_follow_the_per_head_dims_and_run_once():
    config = {"shared_key_dims": [192, 96], "points": [[192, 192], [96, None]]}
    assert layer_speed.timed_points(config) == [
        (192, None),
        (96, None),
        (192, 192),
    ]


def _config(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    layer_speed.add_arguments(parser)
    args = parser.parse_args(argv)
    return layer_speed.resolve_config(args, keras.backend.backend(), "cpu")


def test_default_config_times_shared_values_at_the_goal_point():
    config = _config([])
    assert config["points"] == [[192, 192]]
    assert [192, 192] in config["memory_points"]
    emptied = _config(["--points", "", "--shared-key-dims", "96"])
    assert layer_speed.timed_points(emptied) == [(96, None)]


def test_nothing_to_time_is_refused():
    with pytest.raises(ValueError, match="--shared-key-dims and --points"):
        _config(["--points", "", "--shared-key-dims", ""])


def _speed_row(backend, seq_len, dim, ratio, value_dim=None):
    mode = "forward_backward"
    return {
        "kind": "speed",
        "backend": backend,
        "variant": "jit",
        "mode": mode,
        "seq_len": seq_len,
        "batch_size": 2,
        "shared_key_dim": dim,
        "shared_value_dim": value_dim,
        "collaborative_ms": ratio,
        "mha_ms": 1.0,
        "ratio": ratio,
        "flop_ratio": layer_speed.flop_ratio(seq_len, dim, value_dim),
        "repeats": 5,
        "target_ratio": layer_speed.target_ratio(mode, seq_len, dim, value_dim),
        "status": layer_speed.target_status(
            mode, seq_len, dim, value_dim, ratio
        ),
    }


def test_report_writes_table_and_plot(tmp_path):
    metadata = collect_metadata("layer_speed", True, backend="jax")
    document = new_document("layer_speed", metadata, {})
    document["rows"] = [
        _speed_row("jax", 128, 192, 0.8),
        _speed_row("jax", 128, 96, 0.7),
        _speed_row("jax", 512, 192, 1.3),
        _speed_row("jax", 512, 192, 0.9, value_dim=192),
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
    assert "2 of 3 target checks pass" in markdown
    assert "per-head" in markdown
    assert "0.8" in markdown  # memory relative to MHA
    assert (tmp_path / "layer_speed_jax.png").stat().st_size > 0
