"""Copies of weights that share no buffer with their source.

On JAX, `variable.assign(other_variable)` can share the other's buffer;
training the new model then donates that buffer, which deletes the source's
weights. Every copy keras-collab makes of a user's weights goes through
here.
"""

import numpy as np
from keras import ops


def unshared_copy(value):
    """A NumPy copy of a variable, tensor or array."""
    return np.array(ops.convert_to_numpy(value))


def copy_weights(sources, targets):
    """Assigns `sources` to `targets`, matched by variable path.

    Falls back to order when paths are not unique or differ, and checks
    shapes either way, so that a mismatch fails loudly instead of corrupting
    the model.

    Args:
        sources: Variables to read.
        targets: Variables to write, as many as `sources`.
    """
    if len(sources) != len(targets):
        raise ValueError(
            f"Cannot copy {len(sources)} weights into {len(targets)}."
        )
    source_paths = [w.path for w in sources]
    target_paths = [w.path for w in targets]
    if len(set(source_paths)) == len(sources) and set(source_paths) == set(
        target_paths
    ):
        by_path = {w.path: w for w in sources}
        pairs = [(by_path[t.path], t) for t in targets]
    else:
        pairs = list(zip(sources, targets))
    for source, target in pairs:
        if tuple(source.shape) != tuple(target.shape):
            raise ValueError(
                f"Weight {source.path} has shape {source.shape}, its copy "
                f"{target.path} has {target.shape}."
            )
        target.assign(unshared_copy(source))
