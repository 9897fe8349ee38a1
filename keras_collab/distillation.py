"""Whole-model distillation of a converted model toward its source.

Refinement (`keras_collab.refinement`) fits each attention layer on its own;
what a user compares in the end is the model's output. Distillation trains
the converted model's collaborative query/key side (shared projections,
mixing, content bias: the only weights the conversion approximated) so that
its outputs match the original's on unlabeled calibration batches, with
every other weight frozen. It is the analogue of the paper's short
re-fine-tuning after re-parametrization, without labels.
"""

import math

import keras
import numpy as np

from keras_collab import surgery
from keras_collab.layers import CollaborativeMultiHeadAttention

# Which output of a multi-output model is matched, in order of preference
# (the token features of a KerasHub backbone; of an encoder-decoder, the
# decoder's, which depend on every attention layer), and the padding mask
# that weighs its tokens. A single-output model (e.g. a task) is matched on
# that output, weighted by `padding_mask`.
_OUTPUT_MASKS = {
    "sequence_output": "padding_mask",
    "decoder_sequence_output": "decoder_padding_mask",
}
_DEFAULT_MASK = "padding_mask"


def collaborative_sites(model):
    return surgery.find_attention_sites(
        model,
        predicate=lambda layer: isinstance(layer, CollaborativeMultiHeadAttention),
    )


def query_key_variables(model):
    """The query/key-side variables of every collaborative layer of `model`:
    shared query kernel and bias, shared key kernel, mixing, content bias.
    A layer shared by several sites (ALBERT) is listed once."""
    variables, seen = [], set()
    for site in collaborative_sites(model):
        layer = site.layer
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        candidates = (
            layer.query_dense.kernel,
            layer.query_dense.bias,
            layer.key_dense.kernel,
            layer.mixing,
            layer.content_bias,
        )
        variables.extend(v for v in candidates if v is not None)
    return variables


class _OnlyQueryKeyTrainable:
    """Context: only `query_key_variables(model)` are trainable inside it;
    every layer's `trainable` flag is restored on exit."""

    def __init__(self, model):
        self.model = model
        self.saved = []

    def __enter__(self):
        layers = list(self.model._flatten_layers(include_self=True))
        self.saved = [(layer, layer.trainable) for layer in layers]
        for layer in layers:
            # Leaf layers own the weights; freezing them leaves containers
            # trainable so that the collaborative layers below can be
            # unfrozen.
            if not list(layer._flatten_layers(include_self=False)):
                layer.trainable = False
            else:
                layer.trainable = True
        for site in collaborative_sites(self.model):
            site.layer.query_dense.trainable = True
            site.layer.key_dense.trainable = True
        expected = {id(v) for v in query_key_variables(self.model)}
        trainable = self.model.trainable_weights
        unexpected = [v.path for v in trainable if id(v) not in expected]
        if unexpected:
            raise RuntimeError(
                "Could not freeze everything but the collaborative query/key "
                f"weights; still trainable: {unexpected}"
            )
        return trainable

    def __exit__(self, *exc_info):
        for layer, trainable in reversed(self.saved):
            layer.trainable = trainable


def _output_name(outputs):
    """The key of the distilled output in a dict of outputs."""
    for name in _OUTPUT_MASKS:
        if name in outputs:
            return name
    if len(outputs) == 1:
        return next(iter(outputs))
    raise ValueError(
        "Cannot tell which output to distill among "
        f"{sorted(outputs)}; expected one of {sorted(_OUTPUT_MASKS)}."
    )


def _select_output(outputs):
    if isinstance(outputs, dict):
        return outputs[_output_name(outputs)]
    if isinstance(outputs, (list, tuple)):
        if len(outputs) == 1:
            return outputs[0]
        raise ValueError(
            f"Cannot tell which of the model's {len(outputs)} outputs to distill."
        )
    return outputs


def _outputs_of(model, batch):
    """The distilled output as float32 NumPy, and the name of its mask."""
    outputs = model(batch, training=False)
    mask_name = _DEFAULT_MASK
    if isinstance(outputs, dict):
        mask_name = _OUTPUT_MASKS.get(_output_name(outputs), _DEFAULT_MASK)
    output = keras.ops.cast(_select_output(outputs), "float32")
    return np.asarray(keras.ops.convert_to_numpy(output)), mask_name


def _token_weights(batch, target, mask_name):
    """Per-token weights: the output's padding mask when the batch has one
    that lines up with the output's leading axes (padded tokens weigh 0)."""
    mask = batch.get(mask_name) if isinstance(batch, dict) else None
    if mask is None or target.ndim < 3:
        return None
    mask = np.asarray(mask)
    if mask.shape != target.shape[:2]:
        return None
    return mask.astype("float32")


class _InferenceOutputs(keras.Model):
    """`model`'s distilled output, computed in inference mode.

    `fit` calls its model with `training=True`, which reaches every layer
    (a `training=False` recorded in a functional graph does not survive it);
    dropout would then make the student's outputs noisy copies of what the
    teacher's targets were computed without. Passing `training=False`
    explicitly, inside `call`, keeps it off while the weights train.
    """

    def __init__(self, model, **kwargs):
        # TensorFlow rejects the default name, which starts with "_".
        super().__init__(name="distilled_outputs", **kwargs)
        self.model = model

    def call(self, inputs):
        return _select_output(self.model(inputs, training=False))


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
        weights = item[2] if len(item) > 2 else np.ones(target.shape[:-1], "float32")
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
):
    """Fine-tunes `student`'s collaborative query/key side toward `teacher`.

    The loss is the mean squared error between the student's and the
    teacher's outputs (`sequence_output` of a KerasHub backbone,
    `decoder_sequence_output` of an encoder-decoder, the single output of
    other models), over real tokens only when the batches carry the
    output's padding mask (`padding_mask`, `decoder_padding_mask`). Only the weights the conversion approximated are
    trained (`query_key_variables`); values, output projections, feed-forward
    blocks, norms and embeddings stay as copied. The teacher's outputs are
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

    Returns:
        A dict: `steps`, `loss_before` and `loss_after` (the loss over all
        batches), `trainable_parameters`.

    Example:

    ```python
    result = keras_collab.convert_model(backbone, 0.25, calibration_data=batches)
    keras_collab.distill(backbone, result.model, batches, steps=300)
    ```
    """
    if steps < 1:
        raise ValueError(f"`steps` must be at least 1. Received: {steps}")
    batches = (
        list(calibration_data)
        if isinstance(calibration_data, (list, tuple))
        else [calibration_data]
    )
    if not batches:
        raise ValueError("`calibration_data` is empty.")
    if not collaborative_sites(student):
        raise ValueError(
            f"Model '{student.name}' has no collaborative attention layers "
            "to distill."
        )
    items = []
    for batch in batches:
        target, mask_name = _outputs_of(teacher, batch)
        weights = _token_weights(batch, target, mask_name)
        items.append((batch, target) if weights is None else (batch, target, weights))
    if len({len(item) for item in items}) != 1:
        raise ValueError(
            "Either every calibration batch or none must carry a `padding_mask`."
        )
    keras.utils.set_random_seed(seed)
    with _OnlyQueryKeyTrainable(student) as trainable:
        before = _mean_squared_error(student, items)
        wrapper = _InferenceOutputs(student)
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
