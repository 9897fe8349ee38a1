"""FLOPs of a Transformer encoder, multi-head or collaborative attention.

The one FLOP model of the `inference` suite. A multiply-add counts 2 FLOPs.
Per sequence of T query tokens attending to S key tokens, per layer:

| term | multi-head attention | collaborative, shared key size D̃ |
| --- | --- | --- |
| query and key projections | 2 · 2 · T · D · H·d_k | 2 · 2 · T · D · D̃ |
| value projection | 2 · T · D · H·d_v | the same |
| scores | 2 · H · d_k · T · S | 2 · H · D̃ · T · S |
| mixing (query times the head's mixing vector) | - | 2 · H · T · D̃ |
| softmax-weighted values (context) | 2 · H · d_v · T · S | the same |
| output projection | 2 · T · H·d_v · D | the same |
| feed-forward (two dense layers) | 2 · 2 · T · D · F | the same |

(the key projection runs over S tokens; with S = T, self-attention, as in
the table). Left out, as small against these: the softmax, the biases
(among them the content bias of collaborative attention, 2 · H · D̃ · S),
layer normalisations, activations, embeddings and the pooler. Nothing here
imports Keras.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class EncoderShape:
    """The sizes of a Transformer encoder that its FLOPs depend on.

    Attributes:
        num_layers: Encoder blocks.
        model_dim: D, the hidden size.
        num_heads: H.
        key_dim: d_k, the per-head query/key size of multi-head attention.
        value_dim: d_v, the per-head value size.
        intermediate_dim: F, the feed-forward's inner size.
    """

    num_layers: int
    model_dim: int
    num_heads: int
    key_dim: int
    value_dim: int
    intermediate_dim: int

    @property
    def full_shared_key_dim(self):
        """H · d_k: the D̃ at which collaborative attention is exact."""
        return self.num_heads * self.key_dim


def layer_flops(shape, seq_len, shared_key_dim=None, key_len=None):
    """FLOPs of one encoder layer on one sequence, per term.

    Args:
        shape: An `EncoderShape`.
        seq_len: T, the query tokens.
        shared_key_dim: `None` for multi-head attention, else D̃ of
            collaborative attention.
        key_len: S, the key tokens (default T: self-attention).

    Returns:
        A dict of FLOPs per term (see the module docstring) and `"total"`.
    """
    t = seq_len
    s = seq_len if key_len is None else key_len
    d, h = shape.model_dim, shape.num_heads
    collaborative = shared_key_dim is not None
    query_key_dim = shared_key_dim if collaborative else h * shape.key_dim
    # In collaborative attention every head scores over all D̃ dimensions.
    score_dim = shared_key_dim if collaborative else shape.key_dim
    value_dim = h * shape.value_dim
    terms = {
        "query_key_projections": 2 * (t + s) * d * query_key_dim,
        "value_projection": 2 * s * d * value_dim,
        "scores": 2 * h * score_dim * t * s,
        "mixing": 2 * h * t * shared_key_dim if collaborative else 0,
        "context": 2 * h * shape.value_dim * t * s,
        "output_projection": 2 * t * value_dim * d,
        "feed_forward": 2 * 2 * t * d * shape.intermediate_dim,
    }
    terms["total"] = sum(terms.values())
    return terms


def model_flops(shape, batch_size, seq_len, shared_key_dim=None):
    """FLOPs of the whole encoder's forward pass on a batch."""
    per_layer = layer_flops(shape, seq_len, shared_key_dim)["total"]
    return batch_size * shape.num_layers * per_layer


def flop_ratio(shape, seq_len, shared_key_dim):
    """FLOPs of the collaborative encoder over those of the original.

    The same for every batch size and number of layers.
    """
    return (
        layer_flops(shape, seq_len, shared_key_dim)["total"]
        / layer_flops(shape, seq_len)["total"]
    )


def flop_break_even_dim(shape, seq_len):
    """The D̃ at which the collaborative encoder needs as many FLOPs as the
    original: it needs fewer below it. The FLOPs are affine in D̃, so this
    is exact (and may exceed H · d_k, or be negative where no D̃ helps)."""
    at_zero = layer_flops(shape, seq_len, 0)["total"]
    per_dim = layer_flops(shape, seq_len, 1)["total"] - at_zero
    return (layer_flops(shape, seq_len)["total"] - at_zero) / per_dim
