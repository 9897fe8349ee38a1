"""Whole-model distillation of a converted model toward its source.

Refinement (`keras_collab.conversion.refinement`) fits each attention layer
on its own; what a user compares in the end is the model's output.
Distillation trains the converted model's collaborative query/key side
(shared projections, mixing, content bias: the only weights the conversion
approximated) so that its outputs match the original's on unlabeled
calibration batches, with every other weight frozen. It is the analogue of
the paper's short re-fine-tuning after re-parametrization, without labels.
"""

import math

import keras
import numpy as np

from keras_collab.conversion.attention import is_collaborative
from keras_collab.conversion.calibration import as_batches
from keras_collab.conversion.outputs import main_output_name
from keras_collab.conversion.outputs import mask_name
from keras_collab.conversion.outputs import select_output
from keras_collab.conversion.sites import find_attention_sites
from keras_collab.conversion.training import InferenceModeModel
from keras_collab.conversion.training import only_approximated_trainable


def collaborative_layers(model):
    """The collaborative attention layers of `model`, each once (a layer
    shared by several sites, as in ALBERT, is listed once)."""
    layers, seen = [], set()
    for site in find_attention_sites(model, is_collaborative):
        if id(site.layer) not in seen:
            seen.add(id(site.layer))
            layers.append(site.layer)
    return layers


def query_key_variables(model):
    """The `query_key_variables` of every collaborative layer of `model`."""
    return [
        variable
        for layer in collaborative_layers(model)
        for variable in layer.query_key_variables
    ]


def _outputs_of(model, batch):
    """The compared output as float32 NumPy, and the name of its mask."""
    outputs = model(batch, training=False)
    name = main_output_name(outputs) if isinstance(outputs, dict) else None
    output = keras.ops.cast(select_output(outputs), "float32")
    return np.asarray(keras.ops.convert_to_numpy(output)), mask_name(name)


def _token_weights(batch, target, mask_key):
    """Per-token weights: the output's padding mask when the batch has one
    that lines up with the output's leading axes (padded tokens weigh 0)."""
    mask = batch.get(mask_key) if isinstance(batch, dict) else None
    if mask is None or target.ndim < 3:
        return None
    mask = np.asarray(mask)
    if mask.shape != target.shape[:2]:
        return None
    return mask.astype("float32")


class _Batches(keras.utils.PyDataset):
    """Exactly `steps` (inputs, target[, weights]) batches: shuffled passes
    over the calibration batches, one after another."""

    def __init__(self, items, steps, seed):
        super().__init__()
        self.items = items
        rng = np.random.default_rng(seed)
        passes = math.ceil(steps / len(items))
        self.order = np.concatenate(
            [rng.permutation(len(items)) for _ in range(passes)]
        )[:steps]

    def __len__(self):
        return len(self.order)

    def __getitem__(self, index):
        return self.items[self.order[index]]


def _mean_squared_error(model, items):
    total = count = 0.0
    for item in items:
        batch, target = item[0], item[1]
        weights = (
            item[2] if len(item) > 2 else np.ones(target.shape[:-1], "float32")
        )
        error = ((_outputs_of(model, batch)[0] - target) ** 2).mean(axis=-1)
        error = error.reshape(weights.shape + (-1,)).mean(axis=-1)
        total += float((error * weights).sum())
        count += float(weights.sum())
    return total / max(count, 1.0)


def distill(
    teacher,
    student,
    calibration_data,
    *,
    steps,
    learning_rate=1e-4,
    seed=0,
    progress=False,
    layers=None,
):
    """Fine-tunes what `student`'s conversion approximated toward `teacher`.

    The loss is the mean squared error between the student's and the
    teacher's outputs (`keras_collab.conversion.outputs`: `sequence_output`
    of a KerasHub backbone, `decoder_sequence_output` of an encoder-decoder,
    the single output of other models), over real tokens only when the
    batches carry the output's padding mask. Only the weights the
    conversion approximated are trained
    (`keras_collab.conversion.training.approximated_variables`: the query/key
    side, and the value/output side of layers with shared values);
    per-head values, output projections, feed-forward blocks, norms and
    embeddings stay as copied. The teacher's outputs are
    computed once, beforehand; Adam runs `steps` steps of `Model.fit` over
    shuffled passes of the batches.

    Args:
        teacher: The original model (read only).
        student: The converted model, with the same inputs; trained in place.
        calibration_data: A batch, or list of batches, both models accept.
            Batches may differ in shape (e.g. trimmed to their longest text).
        steps: Optimizer steps.
        learning_rate: Adam learning rate.
        seed: Seed of the batch order.
        progress: Whether to show Keras' progress bar.
        layers: The collaborative layers of `student` to train; by default
            all of them (`convert_model` passes those it placed).

    Returns:
        A dict: `steps`, `loss_before` and `loss_after` (the loss over all
        batches), `trainable_parameters`.

    Example:

    ```python
    result = keras_collab.convert_model(
        backbone, 0.25, calibration_data=batches
    )
    keras_collab.distill(backbone, result.model, batches, steps=300)
    ```
    """
    if steps < 1:
        raise ValueError(f"`steps` must be at least 1. Received: {steps}")
    batches = as_batches(calibration_data)
    if not batches:
        raise ValueError("`calibration_data` is empty.")
    if layers is None:
        layers = collaborative_layers(student)
    if not layers:
        raise ValueError(
            f"Model '{student.name}' has no collaborative attention layers "
            "to distill."
        )
    items = []
    for batch in batches:
        target, mask_name = _outputs_of(teacher, batch)
        weights = _token_weights(batch, target, mask_name)
        items.append(
            (batch, target) if weights is None else (batch, target, weights)
        )
    if len({len(item) for item in items}) != 1:
        raise ValueError(
            "Either every calibration batch or none must carry a "
            "`padding_mask`."
        )
    keras.utils.set_random_seed(seed)
    with only_approximated_trainable(student, layers) as trainable:
        before = _mean_squared_error(student, items)
        wrapper = InferenceModeModel(
            student,
            lambda model, inputs: select_output(model(inputs, training=False)),
            name="distilled_outputs",
        )
        wrapper.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=keras.losses.MeanSquaredError(),
        )
        wrapper.fit(
            _Batches(items, steps, seed),
            epochs=1,
            shuffle=False,
            verbose=1 if progress else 0,
        )
        after = _mean_squared_error(student, items)
    return {
        "steps": int(steps),
        "loss_before": before,
        "loss_after": after,
        "trainable_parameters": int(sum(math.prod(v.shape) for v in trainable)),
    }
