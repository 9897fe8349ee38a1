"""keras-collab: collaborative multi-head attention for Keras 3.

Implements "Multi-Head Attention: Collaborate Instead of Concatenate"
(Cordonnier, Loukas & Jaggi) on every Keras backend: a drop-in replacement for
`keras.layers.MultiHeadAttention` whose heads share their key/query
projections, and tools that re-parametrize pretrained attention into it.

The package is a pipeline; each subpackage imports only those before it:
`kernels` ← `layers` ← `decomposition` (NumPy only) ← `conversion` ← `hub`
(the only KerasHub code) ← `cli`.
"""

import importlib.util

from keras_collab import cli as _cli

# Run as the command line (`keras-collab`, `python -m keras_collab`), these
# imports, which load the backends, leave out their start-up log lines;
# imported as a library, nothing changes (`keras_collab.cli`).
with _cli.quiet_backend_startup(_cli.invoked_as_command()):
    from keras_collab.conversion import convert_attention
    from keras_collab.conversion import convert_model
    from keras_collab.conversion import distill
    from keras_collab.layers import CachedCollaborativeMultiHeadAttention
    from keras_collab.layers import CollaborativeMultiHeadAttention
    from keras_collab.layers import CollaborativeQueryKey
    from keras_collab.layers import ConcatenateMixing
    from keras_collab.layers import get_layout_map

    # With KerasHub installed, register the collaborative twins of its
    # backbones, tasks and tokenizers now, so that `from_preset` can load
    # converted presets right after `import keras_collab`.
    if importlib.util.find_spec("keras_hub") is not None:
        from keras_collab import hub  # noqa: F401

__version__ = "0.2.0"

__all__ = [
    "CachedCollaborativeMultiHeadAttention",
    "CollaborativeMultiHeadAttention",
    "CollaborativeQueryKey",
    "ConcatenateMixing",
    "convert_attention",
    "convert_model",
    "distill",
    "get_layout_map",
    "__version__",
]
