"""The cache-blocked PyTorch CPU kernel against the layer's generic path and
against PyTorch autograd of the equations."""

import numpy as np
import pytest

from tests.conftest import BACKEND

if BACKEND != "torch":
    pytest.skip("PyTorch kernel", allow_module_level=True)

import keras  # noqa: E402
import torch  # noqa: E402

from keras_collab import CollaborativeMultiHeadAttention  # noqa: E402
from keras_collab.kernels import torch_blocked_attention  # noqa: E402

LAYER_MODULE = "keras_collab.layers.collaborative_multi_head_attention"
RNG = np.random.default_rng(11)


def _normal(*shape):
    return RNG.normal(size=shape).astype("float32")


def _attention_from_equations(query, key, mixing, value, bias, mask):
    """softmax((q ⊙ m_h) kᵀ + bias, masked) v_h (or the shared v), with
    PyTorch autograd."""
    logits = torch.einsum("btd,hd,bsd->bhts", query, mixing, key)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = logits.masked_fill(~mask, -1e9)
    probabilities = torch.softmax(logits, dim=-1)
    if value.dim() == 3:
        return torch.einsum("bhts,bsd->bthd", probabilities, value)
    return torch.einsum("bhts,bshd->bthd", probabilities, value)


def _kernel_inputs(
    batch=3, length=7, keys=9, heads=4, dim=6, value_dim=5, shared=False
):
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(
            *shape, generator=generator, dtype=torch.float64
        ).requires_grad_()

    mask = torch.rand(batch, 1, length, keys, generator=generator) > 0.4
    mask[0, 0, 2] = False  # a fully masked row
    return {
        "query": tensor(batch, length, dim),
        "key": tensor(batch, keys, dim),
        "mixing": tensor(heads, dim),
        "value": (
            tensor(batch, keys, value_dim)
            if shared
            else tensor(batch, keys, heads, value_dim)
        ),
        "bias": tensor(batch, heads, 1, keys),
        "mask": mask,
    }


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 2 query rows, so that every test crosses block borders."""
    monkeypatch.setattr(torch_blocked_attention, "BLOCK_ELEMENTS", 2 * 4 * 9)


class TestKernel:
    @pytest.mark.parametrize(
        "shared", [False, True], ids=["per_head", "shared"]
    )
    @pytest.mark.parametrize("with_bias", [False, True])
    @pytest.mark.parametrize("with_mask", [False, True])
    def test_matches_equations_and_gradients(
        self, with_bias, with_mask, shared, small_blocks
    ):
        inputs = _kernel_inputs(shared=shared)
        if not with_bias:
            inputs["bias"] = None
        if not with_mask:
            inputs["mask"] = None
        differentiable = [
            name
            for name in ("query", "key", "mixing", "value", "bias")
            if inputs[name] is not None
        ]
        output = torch_blocked_attention.blocked_collaborative_attention(
            **inputs
        )
        expected = _attention_from_equations(**inputs)
        torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)

        weights = torch.randn_like(output)
        grads = torch.autograd.grad(
            (output * weights).sum(), [inputs[n] for n in differentiable]
        )
        expected_grads = torch.autograd.grad(
            (expected * weights).sum(), [inputs[n] for n in differentiable]
        )
        for name, grad, expected_grad in zip(
            differentiable, grads, expected_grads
        ):
            torch.testing.assert_close(
                grad, expected_grad, rtol=1e-10, atol=1e-10, msg=name
            )

    @pytest.mark.parametrize(
        "shared", [False, True], ids=["per_head", "shared"]
    )
    def test_gradcheck(self, shared, small_blocks):
        inputs = _kernel_inputs(batch=2, length=5, keys=9, shared=shared)
        mask = inputs.pop("mask")

        def attention(query, key, mixing, value, bias):
            return torch_blocked_attention.blocked_collaborative_attention(
                query, key, mixing, value, bias=bias, mask=mask
            )

        assert torch.autograd.gradcheck(attention, tuple(inputs.values()))

    def test_broadcast_mask(self, small_blocks):
        inputs = _kernel_inputs()
        inputs["mask"] = inputs["mask"][:1, :, :1]  # (1, 1, 1, S)
        output = torch_blocked_attention.blocked_collaborative_attention(
            **inputs
        )
        expected = _attention_from_equations(**inputs)
        torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)

    def test_stores_nothing_without_gradients(self):
        inputs = _kernel_inputs()
        with torch.no_grad():
            output = torch_blocked_attention.blocked_collaborative_attention(
                **inputs
            )
        assert output.grad_fn is None
        torch.testing.assert_close(
            output,
            _attention_from_equations(**inputs).detach(),
            rtol=1e-12,
            atol=1e-12,
        )

    def test_supported_inputs(self):
        assert torch_blocked_attention.is_supported(torch.zeros(2))
        assert not torch_blocked_attention.is_supported(
            torch.zeros(2, dtype=torch.bfloat16)
        )
        assert not torch_blocked_attention.is_supported(np.zeros(2))


def _layer(dropout=0.0, **kwargs):
    layer = CollaborativeMultiHeadAttention(
        num_heads=4,
        key_dim=3,
        shared_key_dim=6,
        value_dim=5,
        dropout=dropout,
        **kwargs,
        bias_initializer="random_normal",
        mixing_initializer="random_normal",
    )
    layer.build((None, None, 16), (None, None, 12))
    layer.content_bias.assign(_normal(*layer.content_bias.shape))
    return layer


def _outputs_and_gradients(layer, query, value, **kwargs):
    query = torch.tensor(query, requires_grad=True)
    value = torch.tensor(value, requires_grad=True)
    output = layer(query, value, **kwargs)
    weights = [w.value for w in layer.trainable_weights]
    grads = torch.autograd.grad(output.square().sum(), [query, value] + weights)
    return output.detach().numpy(), [g.numpy() for g in grads]


class TestLayerPaths:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {},
            {"use_causal_mask": True},
            {"attention_mask": RNG.random((2, 7, 9)) > 0.3},
            {"attention_mask": RNG.random((1, 1, 9)) > 0.3},
            {"value_mask": RNG.random((2, 9)) > 0.3, "use_causal_mask": True},
        ],
        ids=["no_mask", "causal", "mask", "broadcast_mask", "padding_causal"],
    )
    @pytest.mark.parametrize(
        "layer_kwargs",
        [{}, {"shared_value_dim": 7}],
        ids=["per_head_values", "shared_values"],
    )
    def test_kernel_matches_einsum_path(
        self, kwargs, layer_kwargs, small_blocks, monkeypatch
    ):
        layer = _layer(**layer_kwargs)
        query, value = _normal(2, 7, 16), _normal(2, 9, 12)
        if kwargs.get("use_causal_mask"):
            value = _normal(2, 7, 12)
            for name in ("attention_mask", "value_mask"):
                if name in kwargs:
                    kwargs[name] = kwargs[name][..., :7]
        calls = []
        original = torch_blocked_attention.blocked_collaborative_attention

        def spy(*args, **kw):
            calls.append(1)
            return original(*args, **kw)

        monkeypatch.setattr(
            torch_blocked_attention, "blocked_collaborative_attention", spy
        )
        blocked = _outputs_and_gradients(layer, query, value, **kwargs)
        assert calls, "the blocked kernel did not run"

        monkeypatch.setattr(
            f"{LAYER_MODULE}.CollaborativeMultiHeadAttention."
            "_use_blocked_torch_kernel",
            lambda self, *args: False,
        )
        generic = _outputs_and_gradients(layer, query, value, **kwargs)
        assert len(calls) == 1
        np.testing.assert_allclose(blocked[0], generic[0], atol=2e-6)
        for grad, expected in zip(blocked[1], generic[1]):
            np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)

    def test_paths_the_kernel_leaves_alone(self):
        layer = _layer(dropout=0.5)
        query = torch.tensor(_normal(2, 7, 16))
        assert layer._use_blocked_torch_kernel(query, False, False)
        assert layer._use_blocked_torch_kernel(query, None, False)
        # Scores are returned, or dropout is active, or half precision.
        assert not layer._use_blocked_torch_kernel(query, False, True)
        assert not layer._use_blocked_torch_kernel(query, True, False)
        assert not layer._use_blocked_torch_kernel(
            query.to(torch.bfloat16), False, False
        )
        assert _layer()._use_blocked_torch_kernel(query, True, False)

    def test_dropout_training_path_agrees_with_kernel(self):
        # Dropout active: the einsum path runs; inference: the kernel. Both
        # give the same output when the dropout draws nothing.
        layer = _layer(dropout=1e-9)
        query, value = _normal(2, 7, 16), _normal(2, 7, 12)
        training = keras.ops.convert_to_numpy(
            layer(query, value, training=True)
        )
        inference = keras.ops.convert_to_numpy(layer(query, value))
        np.testing.assert_allclose(training, inference, atol=2e-6)
