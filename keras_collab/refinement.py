"""Layer-by-layer refinement of converted attention on calibration inputs.

A decomposition minimises a (weighted) error of the logits, but what the
model needs is the same attention *probabilities*. Refinement takes each
converted layer in turn, feeds it the inputs the converted model actually
produces at that point (so earlier layers' residual errors are accounted
for), and fits its query/key side (shared projections, mixing, content bias)
to the original layer's probabilities on those same inputs with a
KL-divergence loss. Values and output projections stay frozen: they were
copied exactly.
"""

import math

import keras
import numpy as np

from keras_collab import surgery
from keras_collab.calibration import record_attention_inputs
from keras_collab.progress import progress_bar


def _recorded_inputs(model, layer, batches):
    """Query, key and mask arrays the layer sees, padded to one length.

    Padded positions are masked out, so they carry no signal: a padded
    query row is fully masked and has the same (uniform) attention in the
    teacher and the student.
    """
    with record_attention_inputs({"layer": layer}) as records:
        for batch in batches:
            model(batch, training=False)
    calls = records["layer"]
    queries = max(q.shape[1] for q, _, _ in calls)
    keys = max(k.shape[1] for _, k, _ in calls)

    def pad(x, length):
        return np.pad(x, [(0, 0), (0, length - x.shape[1]), (0, 0)])

    masks = []
    for q, k, m in calls:
        full = np.ones((q.shape[0], q.shape[1], k.shape[1]), bool)
        m = full if m is None else np.broadcast_to(m, full.shape)
        masks.append(
            np.pad(m, [(0, 0), (0, queries - q.shape[1]), (0, keys - k.shape[1])])
        )
    return (
        np.concatenate([pad(q, queries) for q, _, _ in calls]),
        np.concatenate([pad(k, keys) for _, k, _ in calls]),
        np.concatenate(masks),
    )


OBJECTIVES = ("attention", "output")


def _attend(layer, query, key, mask, objective):
    output, scores = layer(
        query,
        key,
        key=key,
        attention_mask=mask,
        return_attention_scores=True,
        training=False,
    )
    return scores if objective == "attention" else output


def _teacher_targets(layer, query, key, mask, objective, batch_size):
    chunks = []
    for start in range(0, len(query), batch_size):
        part = slice(start, start + batch_size)
        chunks.append(
            keras.ops.convert_to_numpy(
                _attend(layer, query[part], key[part], mask[part], objective)
            )
        )
    return np.concatenate(chunks)


class _InferenceAttention(keras.Model):
    """The student layer on `(query, key, mask)`, in inference mode.

    `fit` calls its model with `training=True`, which would switch on the
    layer's attention dropout: the student's outputs would be noisy copies
    of what the teacher's targets were computed without. Passing
    `training=False` explicitly keeps it off while the weights train.
    """

    def __init__(self, layer, objective, **kwargs):
        # TensorFlow rejects the default name, which starts with "_".
        super().__init__(name="refined_attention", **kwargs)
        self.layer = layer
        self.objective = objective

    def call(self, inputs):
        query, key, mask = inputs
        return _attend(self.layer, query, key, mask, self.objective)


def refine_layer(
    teacher,
    student,
    query,
    key,
    mask,
    *,
    steps,
    learning_rate,
    objective="attention",
    batch_size=16,
):
    """Fits `student`'s query/key side to `teacher` in place.

    Args:
        teacher: The original attention layer.
        student: The converted layer; its query/key side is trained.
        query, key, mask: Inputs the layer sees, `(N, T, D)`, `(N, S, D)`,
            `(N, T, S)`.
        steps: About how many optimizer steps.
        learning_rate: Adam learning rate.
        objective: `"attention"`: KL divergence from the teacher's to the
            student's attention probabilities. `"output"`: squared error of
            the layer outputs over real query tokens, which ignores
            probability errors between keys carrying similar values.
        batch_size: Sequences per step.

    Returns:
        `{"loss_before", "loss_after"}` on these inputs.
    """
    if objective not in OBJECTIVES:
        raise ValueError(
            f"`objective` must be one of {OBJECTIVES}. Received: {objective}"
        )
    target = _teacher_targets(teacher, query, key, mask, objective, batch_size)
    # Train a twin, then copy its weights back: the JAX trainer donates the
    # buffers of the variables it trains, which the model around `student`
    # still uses.
    twin = student.__class__.from_config(student.get_config())
    twin.build(*surgery.build_shapes(student))
    twin.set_weights(student.get_weights())
    twin.value_dense.trainable = False
    twin.output_dense.trainable = False
    if getattr(twin, "_gate_dense", None) is not None:
        twin._gate_dense.trainable = False
    model = _InferenceAttention(twin, objective)
    if objective == "attention":
        loss, weights = keras.losses.KLDivergence(), None
    else:
        # Padded query rows (no key to attend to) carry no signal.
        loss, weights = keras.losses.MeanSquaredError(), mask.any(axis=-1)
        weights = weights.astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
    inputs = [query, key, mask]

    def evaluate():
        return float(
            model.evaluate(
                inputs,
                target,
                sample_weight=weights,
                batch_size=batch_size,
                verbose=0,
            )
        )

    before = evaluate()
    batches_per_epoch = math.ceil(len(query) / batch_size)
    model.fit(
        inputs,
        target,
        sample_weight=weights,
        batch_size=batch_size,
        epochs=max(1, round(steps / batches_per_epoch)),
        shuffle=True,
        verbose=0,
    )
    after = evaluate()
    student.set_weights(twin.get_weights())
    return {"loss_before": before, "loss_after": after}


def refine_layers(
    original,
    converted,
    paths,
    calibration_data,
    *,
    steps,
    learning_rate=1e-3,
    objective="attention",
    seed=0,
    progress=False,
):
    """Refines every converted attention layer, in order, in place.

    Args:
        original: The source model (read only).
        converted: The converted model; its attention layers are trained.
        paths: Site paths, in the order the model calls them.
        calibration_data: A batch or list of batches `converted` accepts.
        steps: About how many optimizer steps per layer.
        learning_rate: Adam learning rate.
        objective: `"attention"` or `"output"`, see `refine_layer`.
        seed: Seed of the shuffling.
        progress: Whether to show a progress bar.

    Returns:
        `{path: {"loss_before", "loss_after"}}`.
    """
    keras.utils.set_random_seed(seed)
    batches = (
        list(calibration_data)
        if isinstance(calibration_data, (list, tuple))
        else [calibration_data]
    )
    results = {}
    for path in progress_bar(paths, "Refining attention", progress):
        teacher = surgery.get_site(original, path).layer
        student = surgery.get_site(converted, path).layer
        query, key, mask = _recorded_inputs(converted, student, batches)
        results[path] = refine_layer(
            teacher,
            student,
            query,
            key,
            mask,
            steps=steps,
            learning_rate=learning_rate,
            objective=objective,
        )
    return results
