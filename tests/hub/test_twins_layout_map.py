"""`get_layout_map` of the collaborative twins of KerasHub backbones: the
rules it gives (every backend; nothing is placed). The twins under
`keras.distribution` are tested in tests/layers/test_distribution.py."""

import keras
import keras_hub
import pytest

from keras_collab.hub.twins import collaborative_backbone_class


def mesh(axis_names=("batch", "model")):
    devices = [f"cpu:{i}" for i in range(8)]
    return keras.distribution.DeviceMesh((2, 4), axis_names, devices)


def axes(layout_map, path):
    layout = layout_map[path]
    return None if layout is None else tuple(layout.axes)


BLOCK = "transformer_layer_3/"
ATTENTION = BLOCK + "self_attention_layer/"


@pytest.mark.parametrize(
    "backbone_cls",
    [keras_hub.models.BertBackbone, keras_hub.models.GPT2Backbone],
)
def test_attention_feedforward_and_embeddings(backbone_cls):
    twin = collaborative_backbone_class(backbone_cls)
    layout_map = twin.get_layout_map(mesh())
    # Attention: heads over "model", the shared query/key replicated.
    assert axes(layout_map, ATTENTION + "mixing") == ("model", None)
    assert axes(layout_map, ATTENTION + "value/kernel") == (
        "batch",
        "model",
        None,
    )
    assert axes(layout_map, ATTENTION + "query/kernel") is None
    assert axes(layout_map, ATTENTION + "key/kernel") is None
    # Feed-forward as KerasHub shards Llama's.
    assert axes(
        layout_map, BLOCK + "feedforward_intermediate_dense/kernel"
    ) == ("batch", "model")
    assert axes(layout_map, BLOCK + "feedforward_output_dense/kernel") == (
        "model",
        "batch",
    )
    assert axes(layout_map, BLOCK + "feedforward_output_dense/bias") is None
    # Embeddings: replicated unless asked for.
    assert axes(layout_map, "token_embedding/embeddings") is None
    assert axes(layout_map, "position_embedding/embeddings") is None
    sharded = twin.get_layout_map(mesh(), shard_embeddings=True)
    assert axes(sharded, "token_embedding/embeddings") == ("model", "batch")
    assert axes(sharded, "position_embedding/embeddings") is None


def test_axis_names_and_shared_values_are_passed_on():
    twin = collaborative_backbone_class(keras_hub.models.BertBackbone)
    layout_map = twin.get_layout_map(
        mesh(("data", "heads")),
        model_parallel_dim_name="heads",
        data_parallel_dim_name="data",
        shared_values=True,
    )
    assert axes(layout_map, ATTENTION + "value_mixing") == ("heads", None)
    assert axes(layout_map, ATTENTION + "value/kernel") is None
    assert axes(
        layout_map, BLOCK + "feedforward_intermediate_dense/kernel"
    ) == ("data", "heads")
    with pytest.raises(ValueError, match="`model_axis` 'model' is not"):
        twin.get_layout_map(mesh(("data", "heads")))


@pytest.mark.parametrize(
    "backbone_cls",
    [keras_hub.models.LlamaBackbone, keras_hub.models.GemmaBackbone],
)
def test_twin_of_a_backbone_with_its_own_layout_keeps_it(backbone_cls):
    # Their attention layers are not Keras MultiHeadAttention layers, so
    # conversion leaves them (and the layout KerasHub gives them) as they
    # are.
    twin = collaborative_backbone_class(backbone_cls)
    device_mesh = mesh()
    expected = backbone_cls.get_layout_map(device_mesh)
    layout_map = twin.get_layout_map(device_mesh)
    assert list(layout_map) == list(expected)
    for key in expected:
        assert layout_map[key].axes == expected[key].axes
