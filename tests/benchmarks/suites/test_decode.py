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


@pytest.mark.parametrize(
    "argv",
    [
        ["--contexts", "2048"],
        ["--dims", "1024"],
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


def _row(backend, batch, context, dim, tokens_per_s, original_tokens_per_s):
    row = {
        "kind": "decode",
        "batch_size": batch,
        "context": context,
        "shared_key_dim": dim,
        "decode_tokens_per_s": tokens_per_s,
        "decode_ms_per_step": 1.0,
        "prefill_s": 1.0,
        "prefill_plus_decode_s": 1.5,
        "generate_s": None,
        "cache_bytes_per_sequence": decode.expected_cache_bytes(
            GPT2, context, dim
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
            target_ratio=decode.target_ratio(batch, context, dim),
            status=decode.target_status(batch, context, dim, ratio),
        )
    return {"backend": backend, **row}


def test_report_writes_targets_losses_and_plot(tmp_path):
    rows = [
        _row("jax", 32, 1024, None, 100.0, 100.0),
        _row("jax", 32, 1024, 192, 130.0, 100.0),
        _row("jax", 8, 1024, None, 50.0, 50.0),
        _row("jax", 8, 1024, 192, 45.0, 50.0),
        _row("jax", 1, 256, None, 20.0, 20.0),
        _row("jax", 1, 256, 768, 15.0, 20.0),
    ]
    document = document_for(decode, "decode", rows, model=GPT2)
    decode.report(document, str(tmp_path), "decode_jax")
    markdown = (tmp_path / "decode_jax.md").read_text()
    assert "1 of 2 target checks pass" in markdown
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
    assert [row["shared_key_dim"] for row in rows] == [None, 64, 16]
    for row in rows:
        assert row["backend"] == name
        assert row["device"] in ("cpu", "gpu", "tpu")
        assert (row["batch_size"], row["context"]) == (2, 32)
        assert row["prompt_length"] == 30
        assert row["decode_tokens_per_s"] > 0 and row["prefill_s"] > 0
        assert row["generate_s"] > 0  # quick times generate() at batch 2
        assert row["cache_bytes_per_sequence"] == row["cache_bytes_expected"]
    layers, heads, d, context = 2, 4, 16, 32
    original, full_size, reduced = rows
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
    for row in (full_size, reduced):
        assert row["ratio"] > 0 and row["status"] is None
    markdown = next(tmp_path.glob("decode_*.md")).read_text()
    assert "## Decode" in markdown and "(--quick)" in markdown
    assert next(tmp_path.glob("decode_*.png")).stat().st_size > 0
