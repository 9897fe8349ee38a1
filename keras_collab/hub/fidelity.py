"""Fidelity: how close a converted model's outputs are to the original's.

The compared output is the one distillation trains on
(`keras_collab.conversion.outputs`): a backbone's `sequence_output`, or an
encoder-decoder's `decoder_sequence_output`, mean-pooled over its padding
mask. The decoder output depends on every attention layer of the model,
encoder and cross-attention included; an encoder-decoder's
`encoder_sequence_output` is compared as well and reported under
`"encoder"`.
"""

import keras
import numpy as np

from keras_collab.conversion.outputs import main_output_name
from keras_collab.conversion.outputs import mask_name

# Secondary outputs also compared, and the key they are reported under.
_SECONDARY_OUTPUTS = {"encoder_sequence_output": "encoder"}
_SINGLE_OUTPUT = "output"


class Fidelity:
    """Compares models with one original on fixed batches.

    The original runs once, when the object is made; each candidate runs
    once per call.

    Args:
        original: The source model.
        batches: Its inputs: a list of dicts of NumPy arrays with the
            compared outputs' padding masks (`keras_collab.hub.text.encode`).

    Example:

    ```python
    fidelity = Fidelity(backbone, held_out_batches)
    fidelity(converted)["mean_cosine"]
    ```
    """

    def __init__(self, original, batches):
        if not batches:
            raise ValueError("Fidelity needs at least one batch.")
        self.batches = list(batches)
        self._reference = [_outputs(original, batch) for batch in batches]
        self._pooled = {
            name: np.concatenate(
                [
                    mean_pooled(outputs[name], _mask(batch, name))
                    for outputs, batch in zip(self._reference, self.batches)
                ]
            )
            for name in self._reference[0]
        }

    def __call__(self, candidate):
        """Measures `candidate` against the original.

        Returns:
            A dict: mean and min cosine of mean-pooled outputs, Spearman
            correlation of the pairwise cosine similarities, max absolute
            difference of the outputs over real tokens, number of texts.
            With a compared output other than `sequence_output`, also
            `output` (its name); for an encoder-decoder, `encoder`: the same
            measures for `encoder_sequence_output`.
        """
        pooled = {name: [] for name in self._pooled}
        max_abs = dict.fromkeys(self._pooled, 0.0)
        for reference, batch in zip(self._reference, self.batches):
            outputs = _outputs(candidate, batch)
            for name, expected in reference.items():
                mask = _mask(batch, name)
                difference = np.abs(expected - outputs[name])
                max_abs[name] = max(
                    max_abs[name], float(difference[mask.astype(bool)].max())
                )
                pooled[name].append(mean_pooled(outputs[name], mask))
        result = None
        for name, rows in pooled.items():
            measures = _compare(
                self._pooled[name], np.concatenate(rows), max_abs[name]
            )
            if result is None:
                result = measures
                if name not in (_SINGLE_OUTPUT, "sequence_output"):
                    result["output"] = name
            else:
                result[_SECONDARY_OUTPUTS[name]] = measures
        return result


def fidelity(original, converted, batches):
    """`Fidelity(original, batches)(converted)`."""
    return Fidelity(original, batches)(converted)


def _outputs(model, batch):
    """`{output name: float32 array}` of the compared outputs, the main one
    first (`"output"` for a single-output model)."""
    outputs = model(batch, training=False)
    if not isinstance(outputs, dict):
        return {_SINGLE_OUTPUT: _float32(outputs)}
    main = main_output_name(outputs)
    names = [main]
    if main != "sequence_output":
        names += [name for name in _SECONDARY_OUTPUTS if name in outputs]
    return {name: _float32(outputs[name]) for name in names}


def _mask(batch, output_name):
    key = mask_name(None if output_name == _SINGLE_OUTPUT else output_name)
    if key not in batch:
        raise ValueError(
            f"Cannot compare output '{output_name}': the inputs "
            f"{sorted(batch)} have no '{key}'."
        )
    return batch[key]


def _float32(tensor):
    return keras.ops.convert_to_numpy(keras.ops.cast(tensor, "float32"))


def mean_pooled(outputs, mask):
    """Mean of `(N, T, D)` outputs over the tokens `mask` marks."""
    mask = mask.astype("float32")[..., None]
    return (outputs * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)


def _compare(reference, candidate, max_abs):
    cosines = cosine_rows(reference, candidate)
    return {
        "mean_cosine": float(cosines.mean()),
        "min_cosine": float(cosines.min()),
        "spearman_pairwise": spearman_of_similarities(reference, candidate),
        "max_abs_difference": max_abs,
        "texts": int(len(cosines)),
    }


def cosine_rows(a, b):
    """Cosine similarity of each row of `a` with the same row of `b`."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def _ranks(values):
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def spearman_of_similarities(reference, candidate):
    """Spearman correlation of all pairwise cosine similarities."""

    def similarities(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        upper = np.triu_indices(len(x), k=1)
        return (x @ x.T)[upper]

    a, b = similarities(reference), similarities(candidate)
    if len(a) < 2:
        return float("nan")
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])
