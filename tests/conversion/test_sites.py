"""Attention sites (`keras_collab.conversion.sites`): found once, each
path resolving to its layer, in backbones, tasks and plain graphs."""

import keras
import numpy as np
import pytest

from keras_collab.conversion import find_sites
from keras_collab.conversion.sites import get_site

keras_hub = pytest.importorskip("keras_hub")

SMALL = dict(
    vocabulary_size=20,
    num_layers=2,
    num_heads=2,
    hidden_dim=8,
    intermediate_dim=16,
    max_sequence_length=16,
)


def test_task_sites_are_the_backbone_sites_under_its_name():
    backbone = keras_hub.models.GPT2Backbone(**SMALL)
    task = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    backbone_paths = [site.path for site in find_sites(backbone)]
    assert backbone_paths == [
        "transformer_layer_0/_self_attention_layer",
        "transformer_layer_1/_self_attention_layer",
    ]
    task_sites = find_sites(task)
    assert [site.path for site in task_sites] == [
        f"{backbone.name}/{path}" for path in backbone_paths
    ]
    for site in task_sites:
        resolved = get_site(task, site.path)
        assert resolved.layer is site.layer
        assert resolved.owner is site.owner
        assert resolved.attribute == "_self_attention_layer"


def test_shared_layer_is_one_site():
    backbone = keras_hub.models.AlbertBackbone(
        **{**SMALL, "vocabulary_size": 20}, embedding_dim=8
    )
    sites = find_sites(backbone)
    assert len(sites) == 1  # ALBERT reuses one block for every layer


def test_graph_nodes_have_no_owner():
    inputs = keras.Input((4, 8))
    attention = keras.layers.MultiHeadAttention(2, 4, name="attention")
    model = keras.Model(inputs, attention(inputs, inputs))
    (site,) = find_sites(model)
    assert (site.path, site.owner, site.attribute) == ("attention", None, None)
    assert get_site(model, "attention").layer is attention
    sequential = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert find_sites(sequential) == []
    assert np.isfinite(
        keras.ops.convert_to_numpy(model(np.ones((1, 4, 8))))
    ).all()
