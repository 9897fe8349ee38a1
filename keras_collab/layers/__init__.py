"""Keras layers of keras-collab."""

from keras_collab.layers.cached_collaborative_multi_head_attention import (
    CachedCollaborativeMultiHeadAttention,
)
from keras_collab.layers.collaborative_multi_head_attention import (
    CollaborativeMultiHeadAttention,
)

__all__ = [
    "CachedCollaborativeMultiHeadAttention",
    "CollaborativeMultiHeadAttention",
]
