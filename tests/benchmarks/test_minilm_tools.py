"""Model-level helpers of the MiniLM suites, on a tiny functional model.

A real KerasHub backbone would exercise the same code paths, but building
and compiling one costs seconds per backend; the helpers only need a model
with dict inputs, a `padding_mask` and attention layers.
"""

import keras
import numpy as np
import pytest

from benchmarks import minilm
from keras_collab import presets
from keras_collab.conversion import convert_model


def _tiny_model():
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="bool", name="padding_mask")
    x = keras.layers.Embedding(40, 16, name="embedding")(token_ids)
    attention = keras.layers.MultiHeadAttention(
        num_heads=2,
        key_dim=4,
        bias_initializer="random_normal",
        name="attention",
    )
    x = keras.layers.Add()([x, attention(x, x)])
    outputs = keras.layers.Dense(16, name="dense")(x)
    return keras.Model(
        {"token_ids": token_ids, "padding_mask": padding_mask}, outputs
    )


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(7)
    model = _tiny_model()
    rng = np.random.default_rng(0)
    batches = []
    for lengths in ([6, 5, 3, 6], [6, 6, 2, 4]):
        mask = np.arange(6)[None, :] < np.array(lengths)[:, None]
        batches.append(
            {
                "token_ids": np.where(
                    mask, rng.integers(1, 40, mask.shape), 0
                ).astype("int32"),
                "padding_mask": mask,
            }
        )
    return model, batches


def test_evaluator_matches_presets_fidelity(tiny):
    backbone, batches = tiny
    converted = convert_model(backbone, 3, max_iter=5).model
    expected = presets.fidelity(backbone, converted, batches)
    got = minilm.FidelityEvaluator(backbone, batches)(converted)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_distillation_trains_only_the_collaborative_query_key_side(tiny):
    backbone, batches = tiny
    student = convert_model(backbone, 3, max_iter=5).model
    trained = {id(v) for v in minilm.collaborative_qk_variables(student)}
    # query kernel, query bias, key kernel, mixing, content bias
    assert len(trained) == 5
    # Paths repeat across transformer layers: match variables by position.
    before = [keras.ops.convert_to_numpy(v).copy() for v in student.weights]
    teacher = [keras.ops.convert_to_numpy(v).copy() for v in backbone.weights]
    result = minilm.distill(
        backbone, student, batches, steps=2, learning_rate=1e-2
    )
    assert result["steps"] == 2
    assert result["trainable_parameters"] == sum(
        int(np.prod(v.shape))
        for v in minilm.collaborative_qk_variables(student)
    )
    for variable, value in zip(student.weights, before):
        changed = not np.array_equal(
            keras.ops.convert_to_numpy(variable), value
        )
        assert changed == (id(variable) in trained), variable.path
    assert np.isfinite(result["loss_after"])
    # Both models still run: on JAX, `fit` donates the buffers of the
    # student's variables, which must not be shared with the teacher's.
    assert np.isfinite(presets.sequence_output(student, batches[0])).all()
    for variable, value in zip(backbone.weights, teacher):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(variable), value
        )
    assert np.isfinite(presets.sequence_output(backbone, batches[0])).all()


def test_clone_backbone_is_independent(tiny):
    from keras_collab import surgery

    backbone, _ = tiny
    copy = minilm.clone_backbone(backbone)
    path = surgery.find_sites(backbone)[0].path
    source = surgery.get_site(backbone, path).layer
    target = surgery.get_site(copy, path).layer
    original = minilm.attention_weights(source)
    minilm.set_query_key(
        target, np.zeros_like(original["query_kernel"]), original["key_kernel"]
    )
    np.testing.assert_array_equal(
        minilm.attention_weights(source)["query_kernel"],
        original["query_kernel"],
    )
    assert not minilm.attention_weights(target)["query_kernel"].any()
