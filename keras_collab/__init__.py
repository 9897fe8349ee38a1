"""keras-collab: collaborative multi-head attention for Keras 3.

Implements "Multi-Head Attention: Collaborate Instead of Concatenate"
(Cordonnier, Loukas & Jaggi) on every Keras backend: a drop-in replacement for
`keras.layers.MultiHeadAttention` whose heads share their key/query
projections, and tools that re-parametrize pretrained attention into it.
"""

from keras_collab.initializers import ConcatenateMixing
from keras_collab.layers import CollaborativeMultiHeadAttention

__version__ = "0.1.0"

__all__ = [
    "CollaborativeMultiHeadAttention",
    "ConcatenateMixing",
    "__version__",
]
