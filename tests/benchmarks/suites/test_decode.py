"""The decode suite: its counts, options and report, and a quick run on the
current backend (a tiny GPT-2, a few seconds; nothing timed is asserted)."""

import json

import pytest

from benchmarks import __main__ as entry_point
from benchmarks.harness.cli import full_parser
from benchmarks.suites import decode
from tests.benchmarks.suites.helpers import document_for
from tests.benchmarks.suites.helpers import resolved_config

TINY = decode.TINY
GPT2 = decode.GPT2_SMALL


def test_original_cache_bytes_are_keras_hubs():
    # 2·H·d·layers·context·4: 72 MiB per sequence at context 1024.
    assert (
        decode.expected_cache_bytes(GPT2, 1024) == 2 * 12 * 64 * 12 * 1024 * 4
    )
    assert decode.expected_cache_bytes(GPT2, 1024) == 72 * 2**20


@pytest.mark.parametrize("dim", [384, 192, 96])
def test_compact_cache_bytes_below_full_size(dim):
    expected = 12 * 1024 * (dim + 12 + 12 * 64) * 4
    assert decode.expected_cache_bytes(GPT2, 1024, dim) == expected


def test_full_size_compact_cache_has_no_content_logits():
    # The exact conversion keeps the query bias in the shared query.
    assert decode.expected_cache_bytes(
        GPT2, 256, 768
    ) == decode.expected_cache_bytes(GPT2, 256)


@pytest.mark.parametrize(
    "dim, value_dim, width",
    [
        # Shared key, H content logits, shared values.
        (192, 192, 192 + 12 + 192),
        (96, 96, 96 + 12 + 96),
        (384, 768, 384 + 12 + 768),
        # Full-size D̃ has no content logits, whatever the value side.
        (768, 96, 768 + 96),
        (768, 768, 768 + 768),
    ],
)
def test_compact_cache_bytes_with_shared_values(dim, value_dim, width):
    assert decode.expected_cache_bytes(GPT2, 1024, dim, value_dim) == (
        12 * 1024 * width * 4
    )


def test_shared_value_cache_is_the_issues_figure():
    # Issue 12: D̃ = D̃_v = 192 caches 396 numbers per token and layer
    # instead of 1536, 3.9x smaller.
    ratio = decode.expected_cache_bytes(GPT2, 1024) / (
        decode.expected_cache_bytes(GPT2, 1024, 192, 192)
    )
    assert ratio == pytest.approx(1536 / 396)
    assert round(ratio, 1) == 3.9


def test_original_cache_takes_no_shared_value_dim():
    with pytest.raises(ValueError, match="shared_value_dim"):
        decode.expected_cache_bytes(GPT2, 1024, None, 192)


# Below full size, at full size, shared values below and at full size.
_TINY_POINTS = [(16, None), (64, None), (16, 8), (16, 64), (64, 16)]


@pytest.mark.parametrize("dim, value_dim", _TINY_POINTS)
def test_expected_cache_bytes_match_the_allocated_cache(dim, value_dim):
    """The formula against the zero cache the converted layers allocate
    (what `_build_cache` starts from) and against the layers' own sizes as
    `compression.decode_cache` counts them."""
    from benchmarks.workloads import compression
    from benchmarks.workloads import gpt2_decode

    original = gpt2_decode.build_causal_lm(TINY)
    converted, _ = gpt2_decode.convert(original, dim, 0, value_dim)
    batch, context = 3, 20
    cache = gpt2_decode.empty_cache(converted, batch, context)
    expected = decode.expected_cache_bytes(TINY, context, dim, value_dim)
    assert gpt2_decode.tree_bytes(cache) == batch * expected
    layers = gpt2_decode.attention_layers(converted)
    counted = compression.decode_cache(layers)["cache_per_token"]
    assert context * counted * 4 == expected
    # And the original's: KerasHub's one tensor.
    original_cache = gpt2_decode.empty_cache(original, batch, context)
    assert gpt2_decode.tree_bytes(original_cache) == batch * (
        decode.expected_cache_bytes(TINY, context)
    )


def test_score_flop_factor():
    assert decode.score_flop_factor(GPT2, 192) == 3
    assert decode.score_flop_factor(GPT2, 768) == 12


@pytest.mark.parametrize(
    "batch, context, dim, ratio, expected",
    [
        (32, 1024, 192, 1.15, "PASS"),
        (32, 1024, 192, 1.14, "MISS"),
        (8, 1024, 192, 1.0, "PASS"),
        (8, 1024, 192, 0.99, "MISS"),
        (8, 1024, 192, None, "MISS"),
        (8, 1024, 96, 0.5, None),
        (1, 256, 192, 0.5, None),
    ],
)
def test_target_status(batch, context, dim, ratio, expected):
    assert decode.target_status(batch, context, dim, ratio) == expected


def test_targets_are_for_per_head_values_only():
    assert decode.target_ratio(32, 1024, 192) == 1.15
    assert decode.target_ratio(32, 1024, 192, 192) is None
    assert decode.target_status(32, 1024, 192, 0.5, 192) is None


def test_model_names():
    assert decode.model_name(None) == "original"
    assert decode.model_name(192) == "collaborative_192"
    assert decode.model_name(192, 192) == "collaborative_192_v192"
    assert decode.model_name(96, None) == "collaborative_96"


def test_points_come_after_dims_and_run_once():
    config = resolved_config(
        decode, ["--dims", "192,96", "--points", "192:192,96,96:96,192:192"]
    )
    assert config["shared_key_dims"] == [192, 96]
    assert decode.converted_points(config) == [
        (192, None),
        (96, None),
        (192, 192),
        (96, 96),
    ]


def test_points_alone_with_empty_dims():
    config = resolved_config(decode, ["--dims", "", "--points", "192:96"])
    assert decode.converted_points(config) == [(192, 96)]


def test_points_add_to_the_default_dims():
    config = resolved_config(decode, ["--points", "192:192"])
    assert decode.converted_points(config) == [
        (768, None),
        (384, None),
        (192, None),
        (96, None),
        (192, 192),
    ]


def test_options_override_the_grid():
    config = resolved_config(
        decode,
        [
            "--batches",
            "1,8",
            "--contexts",
            "256",
            "--dims",
            "192",
            "--new-tokens",
            "8",
            "--repeats",
            "3",
            "--prefill-repeats",
            "1",
            "--generate-batches",
            "",
            "--vocabulary-size",
            "1000",
            "--no-memory",
        ],
    )
    assert config["batch_sizes"] == [1, 8]
    assert config["contexts"] == [256]
    assert config["shared_key_dims"] == [192]
    assert config["new_tokens"] == 8
    assert (config["repeats"], config["prefill_repeats"]) == (3, 1)
    assert config["generate_batch_sizes"] == []
    assert config["model"]["vocabulary_size"] == 1000
    assert config["memory"] is False
    # The defaults are left as they were.
    assert decode.FULL["model"]["vocabulary_size"] == 50257


def test_defaults_are_the_issues_grid():
    config = resolved_config(decode, [])
    assert config["model"] == GPT2
    assert config["batch_sizes"] == [1, 8, 32]
    assert config["contexts"] == [256, 1024]
    assert config["shared_key_dims"] == [768, 384, 192, 96]
    # Shared values only where asked: the default run is not longer.
    assert config["points"] == []
    assert decode.converted_points(config) == [
        (dim, None) for dim in (768, 384, 192, 96)
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--contexts", "2048"],
        ["--dims", "1024"],
        ["--points", "1024:96"],
        ["--points", "192:1024"],
        ["--dims", ""],
        ["--new-tokens", "256", "--contexts", "256"],
        ["--repeats", "0"],
    ],
)
def test_impossible_options_are_rejected(argv):
    with pytest.raises(ValueError):
        resolved_config(decode, argv)


def test_timing_alternates_and_collects_between_calls(monkeypatch):
    order, collections = [], []
    monkeypatch.setattr(decode.gc, "collect", lambda: collections.append(1))
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    stats = decode._time(calls, repeats=3)
    # One untimed round, then three rounds in rotating order.
    assert order == list("abc" + "abc" + "bca" + "cab")
    assert {name: stats[name].repeats for name in "abc"} == dict.fromkeys(
        "abc", 3
    )
    assert len(collections) >= len(order)


def _row(
    backend,
    batch,
    context,
    dim,
    tokens_per_s,
    original_tokens_per_s,
    value_dim=None,
):
    row = {
        "kind": "decode",
        "batch_size": batch,
        "context": context,
        "shared_key_dim": dim,
        "shared_value_dim": value_dim,
        "decode_tokens_per_s": tokens_per_s,
        "decode_ms_per_step": 1.0,
        "prefill_s": 1.0,
        "prefill_plus_decode_s": 1.5,
        "generate_s": None,
        "cache_bytes_per_sequence": decode.expected_cache_bytes(
            GPT2, context, dim, value_dim
        ),
        "prefill_peak_bytes": 2**20,
        "decode_peak_bytes": None,
    }
    if dim is not None:
        ratio = tokens_per_s / original_tokens_per_s
        row.update(
            ratio=ratio,
            prefill_ratio=1.0,
            cache_ratio=row["cache_bytes_per_sequence"]
            / decode.expected_cache_bytes(GPT2, context),
            target_ratio=decode.target_ratio(batch, context, dim, value_dim),
            status=decode.target_status(batch, context, dim, ratio, value_dim),
        )
    return {"backend": backend, **row}


def test_report_writes_targets_losses_and_plot(tmp_path):
    rows = [
        _row("jax", 32, 1024, None, 100.0, 100.0),
        _row("jax", 32, 1024, 192, 130.0, 100.0),
        _row("jax", 32, 1024, 192, 90.0, 100.0, value_dim=192),
        _row("jax", 32, 1024, 96, 160.0, 100.0, value_dim=96),
        _row("jax", 8, 1024, None, 50.0, 50.0),
        _row("jax", 8, 1024, 192, 45.0, 50.0),
        _row("jax", 1, 256, None, 20.0, 20.0),
        _row("jax", 1, 256, 768, 15.0, 20.0),
    ]
    document = document_for(decode, "decode", rows, model=GPT2)
    decode.report(document, str(tmp_path), "decode_jax")
    markdown = (tmp_path / "decode_jax.md").read_text()
    # The shared-value point at D̃ = 192 is no target check.
    assert "1 of 2 target checks pass" in markdown
    assert "## Targets (D̃ = 192, per-head values)" in markdown
    assert "| D̃ | D̃_v |" in markdown
    decode_lines = [
        line
        for line in markdown.splitlines()
        if line.startswith("| jax | 32 | 1024 | 192 |")
    ]
    assert [line.split(" | ")[4] for line in decode_lines] == [
        "per head",
        "192",
    ]
    assert "| jax | 32 | 1024 | original |  |" in markdown
    assert "batch 32 context 1024 D̃ 192 D̃_v 192 (0.90x)" in markdown
    assert "PASS" in markdown and "MISS" in markdown
    assert "## Where collaboration loses" in markdown
    assert "batch 1 context 256 D̃ 768 (0.75x)" in markdown
    assert "12x at D̃ = 768" in markdown
    assert (tmp_path / "decode_jax.png").stat().st_size > 0


def test_quick_run_end_to_end(tmp_path):
    """The quick configuration, trimmed further, on the current backend."""
    argv = [
        "decode",
        "--quick",
        "--output-dir",
        str(tmp_path),
        "--dims",
        "64,16",
        "--points",
        "16:8",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
        "--prefill-repeats",
        "1",
    ]
    args = full_parser("decode", decode, entry_point.SUITES).parse_args(argv)
    assert decode.main(args) == 0
    backend = json.loads(next(tmp_path.glob("decode_*.json")).read_text())
    (name,) = backend["backends"]
    assert not backend["errors"]
    rows = backend["rows"]
    assert [
        (row["shared_key_dim"], row["shared_value_dim"]) for row in rows
    ] == [(None, None), (64, None), (16, None), (16, 8)]
    (config,) = backend["config"].values()
    assert list(config["conversion_s"]) == [
        "collaborative_64",
        "collaborative_16",
        "collaborative_16_v8",
    ]
    for row in rows:
        assert row["backend"] == name
        assert row["device"] in ("cpu", "gpu", "tpu")
        assert (row["batch_size"], row["context"]) == (2, 32)
        assert row["prompt_length"] == 30
        assert row["decode_tokens_per_s"] > 0 and row["prefill_s"] > 0
        assert row["generate_s"] > 0  # quick times generate() at batch 2
        assert row["cache_bytes_per_sequence"] == row["cache_bytes_expected"]
    layers, heads, d, context = 2, 4, 16, 32
    original, full_size, reduced, shared = rows
    assert original["cache_bytes_per_sequence"] == (
        2 * heads * d * layers * context * 4
    )
    assert reduced["cache_bytes_per_sequence"] == (
        layers * context * (16 + heads + heads * d) * 4
    )
    # One compact cache per layer; KerasHub's single tensor for the original.
    assert original["cache_shapes"] == [[2, layers, 2, context, heads, d]]
    assert reduced["cache_shapes"] == [[2, 1, context, 16 + heads + 64]] * 2
    assert full_size["cache_shapes"] == [[2, 1, context, 64 + 64]] * 2
    # Shared values: D̃ + H + D̃_v per token and layer.
    assert shared["cache_shapes"] == [[2, 1, context, 16 + heads + 8]] * 2
    assert shared["cache_bytes_per_sequence"] == (
        layers * context * (16 + heads + 8) * 4
    )
    assert shared["cache_per_token"] == layers * (16 + heads + 8)
    assert shared["value_cache_share"] == pytest.approx(8 / 28)
    assert original["cache_per_token"] is None
    for row in (full_size, reduced, shared):
        assert row["ratio"] > 0 and row["status"] is None
        assert (
            row["cache_per_token"] * context * 4
            == (row["cache_bytes_per_sequence"])
        )
    markdown = next(tmp_path.glob("decode_*.md")).read_text()
    assert "## Decode" in markdown and "(--quick)" in markdown
    assert next(tmp_path.glob("decode_*.png")).stat().st_size > 0
