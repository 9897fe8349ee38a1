"""Model-level helpers of the MiniLM suites, on a tiny functional model.

A real KerasHub backbone would exercise the same code paths, but building
and compiling one costs seconds per backend; the helpers only need a model
with dict inputs, a `padding_mask` and attention layers.
"""

import keras
import numpy as np
import pytest

from benchmarks.workloads import compression
from benchmarks.workloads import minilm
from keras_collab import decomposition
from keras_collab.conversion import convert_model
from keras_collab.conversion import find_sites
from keras_collab.conversion.distillation import query_key_variables
from keras_collab.conversion.outputs import select_output
from keras_collab.conversion.sites import get_site


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


def _pooled(model, batches):
    """Mean-pooled outputs over real tokens, and the outputs themselves."""
    outputs, pooled = [], []
    for batch in batches:
        output = keras.ops.convert_to_numpy(model(batch, training=False))
        mask = batch["padding_mask"].astype("float64")[..., None]
        outputs.append(output)
        pooled.append((output * mask).sum(axis=1) / mask.sum(axis=1))
    return outputs, np.concatenate(pooled)


def _spearman(a, b):
    """Spearman correlation of tie-free values: Pearson of their ranks."""
    ranks_a = np.argsort(np.argsort(a))
    ranks_b = np.argsort(np.argsort(b))
    return np.corrcoef(ranks_a, ranks_b)[0, 1]


def _pairwise_cosines(x):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return (x @ x.T)[np.triu_indices(len(x), k=1)]


def test_evaluator_measures_what_the_equations_say(tiny):
    backbone, batches = tiny
    converted = convert_model(backbone, 3, max_iter=5).model
    got = minilm.evaluator(backbone, batches)(converted)

    reference_outputs, reference = _pooled(backbone, batches)
    candidate_outputs, candidate = _pooled(converted, batches)
    cosines = np.sum(reference * candidate, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    )
    max_abs = max(
        np.abs(want - have)[batch["padding_mask"]].max()
        for want, have, batch in zip(
            reference_outputs, candidate_outputs, batches
        )
    )
    expected = {
        "mean_cosine": cosines.mean(),
        "min_cosine": cosines.min(),
        "spearman_pairwise": _spearman(
            _pairwise_cosines(reference), _pairwise_cosines(candidate)
        ),
        "max_abs_difference": max_abs,
        "texts": 8,
    }
    assert set(got) == {*expected, "evaluation_s"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert got["evaluation_s"] > 0


def _output(model, batch):
    return keras.ops.convert_to_numpy(
        select_output(model(batch, training=False))
    )


def test_distillation_trains_only_the_collaborative_query_key_side(tiny):
    backbone, batches = tiny
    student = convert_model(backbone, 3, max_iter=5).model
    trained = {id(v) for v in query_key_variables(student)}
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
        int(np.prod(v.shape)) for v in query_key_variables(student)
    )
    for variable, value in zip(student.weights, before):
        changed = not np.array_equal(
            keras.ops.convert_to_numpy(variable), value
        )
        assert changed == (id(variable) in trained), variable.path
    assert np.isfinite(result["loss_after"])
    # Both models still run: on JAX, `fit` donates the buffers of the
    # student's variables, which must not be shared with the teacher's.
    assert np.isfinite(_output(student, batches[0])).all()
    for variable, value in zip(backbone.weights, teacher):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(variable), value
        )
    assert np.isfinite(_output(backbone, batches[0])).all()


def test_clone_backbone_is_independent(tiny):
    backbone, _ = tiny
    copy = minilm.clone_backbone(backbone)
    path = find_sites(backbone)[0].path
    source = get_site(backbone, path).layer
    target = get_site(copy, path).layer
    original = minilm.attention_weights(source)
    minilm.set_query_key(
        target, np.zeros_like(original["query_kernel"]), original["key_kernel"]
    )
    np.testing.assert_array_equal(
        minilm.attention_weights(source)["query_kernel"],
        original["query_kernel"],
    )
    assert not minilm.attention_weights(target)["query_kernel"].any()


def test_parafac_built_layer_holds_the_factors():
    pytest.importorskip("tensorly")
    inputs = keras.Input((5, 16))
    mha = keras.layers.MultiHeadAttention(
        num_heads=2,
        key_dim=4,
        bias_initializer="random_normal",
        name="attention",
    )
    model = keras.Model(inputs, mha(inputs, inputs))
    converted, results, _ = minilm.parafac_model(model, 3, n_iter_max=5)
    (path,) = results
    result = results[path]
    layer = converted.get_layer("attention")
    factors = compression.layer_factors(layer)
    for got, want in zip(
        factors, (result.query_kernel, result.key_kernel, result.mixing)
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    query_kernels = np.transpose(
        keras.ops.convert_to_numpy(mha.query_dense.kernel), (1, 0, 2)
    )
    key_kernels = np.transpose(
        keras.ops.convert_to_numpy(mha.key_dense.kernel), (1, 0, 2)
    )
    error = decomposition.relative_error(query_kernels, key_kernels, *factors)
    assert error == pytest.approx(result.relative_error, rel=1e-4)
    # The content bias is the package's: c_h = W_K^h b_Q^h.
    query_bias = keras.ops.convert_to_numpy(mha.query_dense.bias)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.content_bias),
        np.einsum("hkd,hd->kh", key_kernels, query_bias),
        rtol=1e-5,
        atol=1e-6,
    )
