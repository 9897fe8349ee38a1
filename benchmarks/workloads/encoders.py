"""The encoders the `inference` suite times, and their converted forms.

Three BERT-like KerasHub backbones: the real all-MiniLM-L6-v2 (the bundled
checkpoint), a randomly initialised backbone of BERT-base shape, and a tiny
random one for `--quick`. The converted models are structural conversions
(`keras_collab.conversion.latency.structural_conversion`): the architecture
of a real conversion at each D̃, weights from the data-free spectral start
of the decomposition, because the values of the weights do not change how
long the arithmetic takes. This module imports Keras: only call it from a
suite's `main`.
"""

import keras
import keras_hub

from benchmarks.workloads.encoder_flops import EncoderShape
from keras_collab.conversion import find_sites
from keras_collab.conversion.latency import structural_conversion

# name -> keyword arguments of keras_hub.models.BertBackbone; "minilm" is
# the bundled checkpoint instead.
RANDOM_BACKBONES = {
    "bert_base": dict(
        vocabulary_size=30522,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        intermediate_dim=3072,
        max_sequence_length=512,
    ),
    "tiny": dict(
        vocabulary_size=64,
        num_layers=2,
        num_heads=4,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=64,
    ),
}
MODELS = ("minilm", *RANDOM_BACKBONES)


def load_backbone(name, seed=0):
    """The original backbone `name` (one of `MODELS`)."""
    if name == "minilm":
        from benchmarks.workloads.minilm import minilm_path

        return keras_hub.models.Backbone.from_preset(minilm_path())
    if name not in RANDOM_BACKBONES:
        raise ValueError(f"Unknown model {name!r}; expected one of {MODELS}")
    keras.utils.set_random_seed(seed)
    return keras_hub.models.BertBackbone(**RANDOM_BACKBONES[name])


def encoder_shape(backbone):
    """The `EncoderShape` of a BERT-like KerasHub backbone, read from it
    and from its first attention layer."""
    layer = find_sites(backbone)[0].layer
    return EncoderShape(
        num_layers=backbone.num_layers,
        model_dim=backbone.hidden_dim,
        num_heads=layer.num_heads,
        key_dim=layer.key_dim,
        value_dim=layer.value_dim,
        intermediate_dim=backbone.intermediate_dim,
    )


def converted_backbones(backbone, shared_key_dims):
    """`{D̃: converted backbone}`, structural conversions of `backbone`."""
    return {
        dim: structural_conversion(backbone, dim) for dim in shared_key_dims
    }
