"""Keras layers of keras-collab: the collaborative attention layer, its
cached twin for KerasHub decoders, the mixing initializers, and the
layouts of their weights for `keras.distribution`."""

from keras_collab.layers.cached_collaborative_multi_head_attention import (
    CachedCollaborativeMultiHeadAttention,
)
from keras_collab.layers.collaborative_multi_head_attention import (
    CollaborativeMultiHeadAttention,
)
from keras_collab.layers.collaborative_multi_head_attention import (
    CollaborativeQueryKey,
)
from keras_collab.layers.collaborative_multi_head_attention import (
    CollaborativeValueOutput,
)
from keras_collab.layers.distribution import get_layout_map
from keras_collab.layers.initializers import ConcatenateMixing

__all__ = [
    "CachedCollaborativeMultiHeadAttention",
    "CollaborativeMultiHeadAttention",
    "CollaborativeQueryKey",
    "CollaborativeValueOutput",
    "ConcatenateMixing",
    "get_layout_map",
]
