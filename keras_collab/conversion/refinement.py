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

from keras_collab.conversion.calibration import as_batches
from keras_collab.conversion.calibration import compiled_input_recorder
from keras_collab.conversion.progress import progress_bar
from keras_collab.conversion.sites import get_site
from keras_collab.conversion.training import InferenceModeModel
from keras_collab.conversion.training import only_approximated_trainable
from keras_collab.layers.collaborative_multi_head_attention import (
    mha_input_shapes,
)


def _padded_inputs(calls):
    """Query, key, mask and value arrays of recorded calls, padded to one
    length.

    Padded positions are masked out, so they carry no signal: a padded
    query row is fully masked and has the same (uniform) attention in the
    teacher and the student.
    """
    queries = max(call.query.shape[1] for call in calls)
    keys = max(call.key.shape[1] for call in calls)

    def pad(x, length):
        return np.pad(x, [(0, 0), (0, length - x.shape[1]), (0, 0)])

    masks = []
    for call in calls:
        q, k = call.query, call.key
        full = np.ones((q.shape[0], q.shape[1], k.shape[1]), bool)
        m = (
            full
            if call.mask is None
            else np.broadcast_to(call.mask, full.shape)
        )
        masks.append(
            np.pad(
                m, [(0, 0), (0, queries - q.shape[1]), (0, keys - k.shape[1])]
            )
        )
    return (
        np.concatenate([pad(call.query, queries) for call in calls]),
        np.concatenate([pad(call.key, keys) for call in calls]),
        np.concatenate(masks),
        np.concatenate([pad(call.value, keys) for call in calls]),
    )


OBJECTIVES = ("attention", "output")


def _attend(layer, query, key, mask, value, objective):
    output, scores = layer(
        query,
        value,
        key=key,
        attention_mask=mask,
        return_attention_scores=True,
        training=False,
    )
    return scores if objective == "attention" else output


def _teacher_targets(layer, inputs, objective, batch_size):
    chunks = []
    for start in range(0, len(inputs[0]), batch_size):
        part = [x[start : start + batch_size] for x in inputs]
        chunks.append(
            keras.ops.convert_to_numpy(_attend(layer, *part, objective))
        )
    return np.concatenate(chunks)


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
    value=None,
):
    """Fits `student`'s approximated weights to `teacher` in place.

    With the `"attention"` objective, the query/key side trains; with
    `"output"`, the value/output side too when the layer shares values
    (`shared_value_dim`), since the conversion approximated it as well.

    Args:
        teacher: The original attention layer.
        student: The converted layer.
        query, key, mask: Inputs the layer sees, `(N, T, D)`, `(N, S, D)`,
            `(N, T, S)`.
        steps: About how many optimizer steps.
        learning_rate: Adam learning rate.
        objective: `"attention"`: KL divergence from the teacher's to the
            student's attention probabilities. `"output"`: squared error of
            the layer outputs over real query tokens, which ignores
            probability errors between keys carrying similar values.
        batch_size: Sequences per step.
        value: Value inputs `(N, S, D_v)`; by default `key`.

    Returns:
        `{"loss_before", "loss_after"}` on these inputs.
    """
    if objective not in OBJECTIVES:
        raise ValueError(
            f"`objective` must be one of {OBJECTIVES}. Received: {objective}"
        )
    inputs = [query, key, mask, key if value is None else value]
    target = _teacher_targets(teacher, inputs, objective, batch_size)
    # Train a twin, then copy its weights back: the JAX trainer donates the
    # buffers of the variables it trains, which the model around `student`
    # still uses.
    twin = student.__class__.from_config(student.get_config())
    twin.build(*mha_input_shapes(student))
    twin.set_weights(student.get_weights())
    model = InferenceModeModel(
        twin,
        lambda layer, inputs: _attend(layer, *inputs, objective),
        name="refined_attention",
    )
    if objective == "attention":
        loss, weights = keras.losses.KLDivergence(), None
    else:
        # Padded query rows (no key to attend to) carry no signal.
        loss, weights = keras.losses.MeanSquaredError(), mask.any(axis=-1)
        weights = weights.astype("float32")

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

    value_side = objective == "output"
    with only_approximated_trainable(model, [twin], value_side=value_side):
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
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
    batches = as_batches(calibration_data)
    students = {path: get_site(converted, path).layer for path in paths}
    # A layer shared by several sites (ALBERT) is recorded once, under its
    # first path, with the calls of every site.
    first_path = {}
    for path, layer in students.items():
        first_path.setdefault(id(layer), path)
    recorded = {path: students[path] for path in first_path.values()}
    results = {}
    with compiled_input_recorder(converted, recorded) as record:
        for path in progress_bar(paths, "Refining attention", progress):
            calls = record(batches)[first_path[id(students[path])]]
            query, key, mask, value = _padded_inputs(calls)
            results[path] = refine_layer(
                get_site(original, path).layer,
                students[path],
                query,
                key,
                mask,
                value=value,
                steps=steps,
                learning_rate=learning_rate,
                objective=objective,
            )
    return results
