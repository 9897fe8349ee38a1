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


def _probabilities(layer, query, key, mask, batch_size):
    chunks = []
    for start in range(0, len(query), batch_size):
        part = slice(start, start + batch_size)
        _, scores = layer(
            query[part],
            key[part],
            key=key[part],
            attention_mask=mask[part],
            return_attention_scores=True,
        )
        chunks.append(keras.ops.convert_to_numpy(scores))
    return np.concatenate(chunks)


def _scores_model(layer, query, key, mask):
    query_input = keras.Input(query.shape[1:])
    key_input = keras.Input(key.shape[1:])
    mask_input = keras.Input(mask.shape[1:], dtype="bool")
    _, scores = layer(
        query_input,
        key_input,
        key=key_input,
        attention_mask=mask_input,
        return_attention_scores=True,
    )
    return keras.Model([query_input, key_input, mask_input], scores)


def refine_layer(
    teacher, student, query, key, mask, *, steps, learning_rate, batch_size=16
):
    """Fits `student`'s query/key side to `teacher`'s attention in place.

    Returns:
        `{"loss_before", "loss_after"}`: mean KL divergence from the
        teacher's to the student's probabilities on these inputs.
    """
    target = _probabilities(teacher, query, key, mask, batch_size)
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
    model = _scores_model(twin, query, key, mask)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.KLDivergence(),
    )
    inputs = [query, key, mask]
    before = model.evaluate(inputs, target, batch_size=batch_size, verbose=0)
    batches_per_epoch = math.ceil(len(query) / batch_size)
    model.fit(
        inputs,
        target,
        batch_size=batch_size,
        epochs=max(1, round(steps / batches_per_epoch)),
        shuffle=True,
        verbose=0,
    )
    after = model.evaluate(inputs, target, batch_size=batch_size, verbose=0)
    student.set_weights(twin.get_weights())
    return {"loss_before": float(before), "loss_after": float(after)}


def refine_layers(
    original,
    converted,
    paths,
    calibration_data,
    *,
    steps,
    learning_rate=1e-3,
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
        )
    return results
