"""The FLOP model of the `inference` suite, against counts by hand."""

import pytest

from benchmarks.workloads import encoder_flops
from benchmarks.workloads.encoder_flops import EncoderShape

# D = 4, H = 2, d_k = 3, d_v = 5, F = 7; T = S = 6.
SMALL = EncoderShape(
    num_layers=3,
    model_dim=4,
    num_heads=2,
    key_dim=3,
    value_dim=5,
    intermediate_dim=7,
)
MINILM = EncoderShape(6, 384, 12, 32, 32, 1536)


def test_multi_head_terms_by_hand():
    # Multiply-adds, times 2:
    # Q and K: 6 tokens x 4 inputs x 6 outputs each = 144 each;
    # V: 6 x 4 x 10 = 240; scores: 2 heads x 6 x 6 x 3 = 216;
    # context: 2 x 6 x 6 x 5 = 360; output: 6 x 10 x 4 = 240;
    # feed-forward: 6 x 4 x 7 twice = 336.
    assert encoder_flops.layer_flops(SMALL, 6) == {
        "query_key_projections": 576,
        "value_projection": 480,
        "scores": 432,
        "mixing": 0,
        "context": 720,
        "output_projection": 480,
        "feed_forward": 672,
        "total": 3360,
    }


def test_collaborative_terms_by_hand():
    # D̃ = 4: Q and K 6 x 4 x 4 = 96 each; scores 2 heads x 6 x 6 x 4 = 288;
    # mixing 2 heads x 6 x 4 = 48; the rest as multi-head attention.
    assert encoder_flops.layer_flops(SMALL, 6, shared_key_dim=4) == {
        "query_key_projections": 384,
        "value_projection": 480,
        "scores": 576,
        "mixing": 96,
        "context": 720,
        "output_projection": 480,
        "feed_forward": 672,
        "total": 3408,
    }


def test_cross_attention_key_length():
    # T = 2 queries, S = 6 keys: the key projection runs over 6 tokens, the
    # value projection over 6, scores and context over 2 x 6 pairs.
    flops = encoder_flops.layer_flops(SMALL, 2, key_len=6)
    assert flops["query_key_projections"] == 2 * (2 * 4 * 6 + 6 * 4 * 6)
    assert flops["value_projection"] == 2 * 6 * 4 * 10
    assert flops["scores"] == 2 * 2 * 3 * 2 * 6
    assert flops["context"] == 2 * 2 * 5 * 2 * 6


def test_model_flops_scale_with_batch_and_layers():
    assert encoder_flops.model_flops(SMALL, 5, 6) == 5 * 3 * 3360
    assert encoder_flops.model_flops(SMALL, 5, 6, 4) == 5 * 3 * 3408


def test_minilm_ratios_match_the_issue():
    # Issue 13: per layer at T = 128, feed-forward included, 1.05x at
    # D̃ = 192, 0.935x at 96 and 0.875x at 48; at 96 fewer FLOPs than the
    # original for every T below about 288.
    ratios = [encoder_flops.flop_ratio(MINILM, 128, d) for d in (192, 96, 48)]
    assert ratios == pytest.approx([1.054, 0.935, 0.875], abs=1e-3)
    assert encoder_flops.flop_ratio(MINILM, 280, 96) < 1.0
    assert encoder_flops.flop_ratio(MINILM, 296, 96) > 1.0


def test_full_size_costs_more_than_the_original():
    assert encoder_flops.flop_ratio(MINILM, 128, 384) > 1.2


def test_break_even_dim_is_where_the_flops_match():
    for seq_len in (128, 512):
        dim = encoder_flops.flop_break_even_dim(MINILM, seq_len)
        assert encoder_flops.flop_ratio(MINILM, seq_len, dim) == (
            pytest.approx(1.0, abs=1e-12)
        )
        assert encoder_flops.flop_ratio(MINILM, seq_len, dim - 1) < 1.0
        assert encoder_flops.flop_ratio(MINILM, seq_len, dim + 1) > 1.0


def test_full_shared_key_dim():
    assert MINILM.full_shared_key_dim == 384
