"""KerasHub integration: collaborative backbones that save and load as presets.

A converted KerasHub backbone must come back from `save_to_preset` through
KerasHub's own loaders (`keras_hub.models.Backbone.from_preset`, its task
classes, its tokenizer). Those rebuild a model from its config, so the swap of
attention layers has to be part of the config. For each KerasHub backbone
class `XBackbone` this module registers `CollaborativeXBackbone`, a subclass
that takes one more argument, `collaborative_attention`: a mapping from
attention-site paths (see `keras_collab.conversion.sites`) to the serialized
collaborative layers that replace them. It builds `XBackbone` as usual, then
swaps those layers in; its weights file therefore holds the collaborative
weights.

KerasHub finds tasks, preprocessors and tokenizers for a backbone through
their `backbone_cls` attribute, so each of those classes gets a registered
`Collaborative...` twin whose `backbone_cls` is the collaborative backbone.
Everything is registered when `keras_collab` is imported, and so is the
assembler that `keras_collab.convert_model` uses to rebuild KerasHub
backbones and tasks with their converted layers.
"""

import contextlib
import dataclasses
import inspect
import json

import keras
import keras_hub

from keras_collab.conversion.model import register_assembler
from keras_collab.conversion.sites import get_site
from keras_collab.conversion.sites import replace_attribute
from keras_collab.hub.decoding import decoding_mixin
from keras_collab.layers.collaborative_multi_head_attention import (
    mha_input_shapes,
)
from keras_collab.layers.distribution import get_layout_map
from keras_collab.layers.weights import copy_weights
from keras_collab.layers.weights import unshared_copy

_COLLABORATIVE_CLASSES = {}
_PACKAGE = "keras_collab"


class CollaborativeBackboneMixin:
    """Swaps attention layers of a KerasHub backbone for collaborative ones.

    Args:
        collaborative_attention: `{site path: serialized layer}`, as written
            by `keras_collab.convert_model`.
        *args, **kwargs: Those of the KerasHub backbone.
    """

    def __init__(self, *args, collaborative_attention=None, **kwargs):
        super().__init__(*args, **kwargs)
        # A plain JSON copy, kept out of Keras' attribute tracking: it is
        # configuration, not state.
        object.__setattr__(
            self,
            "_collaborative_attention",
            _json_copy(collaborative_attention or {}),
        )
        for path, serialized in self._collaborative_attention.items():
            site = get_site(self, path)
            serialized = _json_copy(serialized)
            # The backbone's dtype (e.g. `from_preset(..., dtype=...)`) wins
            # over the one recorded at conversion time.
            serialized["config"]["dtype"] = site.layer.dtype_policy
            serialized["config"]["name"] = site.layer.name
            # Build for the shapes of the layer it replaces, not for shapes
            # recorded elsewhere.
            serialized.pop("build_config", None)
            layer = keras.saving.deserialize_keras_object(serialized)
            # Built where the layer it replaces was, so that its variables
            # keep that layer's paths ("transformer_layer_0/
            # self_attention_layer/query/kernel"), not one path repeated in
            # every block.
            with _name_scope(site.layer.path.rpartition("/")[0]):
                layer.build(*mha_input_shapes(site.layer))
            replace_attribute(site, layer)
        _refresh_torch_parameters(self)

    @property
    def collaborative_attention(self):
        return _json_copy(self._collaborative_attention)

    def get_config(self):
        config = super().get_config()
        config["collaborative_attention"] = self.collaborative_attention
        return config

    @classmethod
    def get_layout_map(
        cls,
        device_mesh,
        model_parallel_dim_name="model",
        data_parallel_dim_name="batch",
        shared_values=False,
        shard_embeddings=False,
    ):
        """A `keras.distribution.LayoutMap` for this collaborative backbone.

        As KerasHub's `LlamaBackbone.get_layout_map`, for
        `keras.distribution.ModelParallel`: build or load the backbone (or
        a task around it) under the distribution's scope and its weights
        are created with these layouts.

        * Attention: `keras_collab.get_layout_map`, heads split over the
          model axis, the shared query/key projections replicated (its
          docstring explains why).
        * Feed-forward blocks of KerasHub's `TransformerEncoder` and
          `TransformerDecoder` (BERT, RoBERTa, DistilBERT, ELECTRA, GPT-2,
          OPT, BART, ...), as KerasHub shards Llama's: the intermediate
          kernel `(D, F)` over `(data, model)`, the output kernel `(F, D)`
          over `(model, data)`. Feed-forward layers named otherwise are
          replicated.
        * The token embedding `(V, D)`: replicated, unless
          `shard_embeddings=True`, which splits it as KerasHub's Llama and
          Gemma do, `(model, data)`. That needs `V` to be a multiple of the
          model axis size, which the vocabularies of the backbones with
          Keras attention layers rarely are (BERT's 30522 splits in 2, not
          4; GPT-2's 50257 in none).

        The twin of a backbone whose KerasHub class has a layout of its own
        (Llama, Gemma, Qwen) returns that layout: their attention layers
        are not Keras `MultiHeadAttention` layers, which conversion
        replaces, so the twin's weights are the original's.

        Args:
            device_mesh: A `keras.distribution.DeviceMesh`.
            model_parallel_dim_name: The mesh axis the weights are split
                over.
            data_parallel_dim_name: The mesh axis the batch is split over.
            shared_values: Whether the conversion shared the values
                (`shared_value_dim`); see `keras_collab.get_layout_map`.
            shard_embeddings: Whether to split the token embedding.

        Returns:
            A `keras.distribution.LayoutMap`.

        Example:

        ```python
        mesh = keras.distribution.DeviceMesh(
            (2, 4), ("batch", "model"), keras.distribution.list_devices()
        )
        backbone_cls = keras_collab.hub.twins.collaborative_backbone_class(
            keras_hub.models.BertBackbone
        )
        distribution = keras.distribution.ModelParallel(
            layout_map=backbone_cls.get_layout_map(mesh),
            batch_dim_name="batch",
        )
        with distribution.scope():
            classifier = keras_hub.models.TextClassifier.from_preset(
                "converted_preset", num_classes=2
            )
        ```
        """
        own = _keras_hub_layout_map(cls)
        if own is not None:
            return own(
                device_mesh,
                model_parallel_dim_name=model_parallel_dim_name,
                data_parallel_dim_name=data_parallel_dim_name,
            )
        model, data = model_parallel_dim_name, data_parallel_dim_name
        layout_map = get_layout_map(
            device_mesh, model, data, shared_values=shared_values
        )
        layout_map[r".*feedforward_intermediate_dense/kernel"] = (data, model)
        layout_map[r".*feedforward_output_dense/kernel"] = (model, data)
        if shard_embeddings:
            layout_map[r"(.*/)?token_embedding/embeddings"] = (model, data)
        return layout_map


def _keras_hub_layout_map(cls):
    """The `get_layout_map` that KerasHub defines on a base class of the
    twin `cls`, or `None`."""
    for base in cls.__mro__:
        if (
            issubclass(base, keras_hub.models.Backbone)
            and not issubclass(base, CollaborativeBackboneMixin)
            and "get_layout_map" in vars(base)
        ):
            return base.get_layout_map
    return None


@contextlib.contextmanager
def _name_scope(path):
    """Opens the name scopes of `path` ("a/b"), in which new variables get
    paths "a/b/..."."""
    with contextlib.ExitStack() as stack:
        for name in filter(None, path.split("/")):
            stack.enter_context(keras.name_scope(name))
        yield


def _refresh_torch_parameters(model):
    """On PyTorch, each layer registers the torch Parameters of its
    variables, keyed by path, when it is built; `parameters()`,
    `state_dict()` and the trainer's `zero_grad()` read those registries.
    After a swap they still hold the replaced layers' variables and not the
    new ones, whose gradients `fit` would then never clear: rebuild them.
    Other backends have no such registry."""
    for layer in model._flatten_layers(include_self=True):
        if hasattr(layer, "_torch_params"):
            layer._track_variables()


def _json_copy(value):
    return json.loads(json.dumps(value))


def _register(cls):
    return keras.saving.register_keras_serializable(
        package=_PACKAGE, name=cls.__name__
    )(cls)


def collaborative_backbone_class(backbone_cls):
    """The registered collaborative twin of a KerasHub backbone class.

    Also registers twins of the tasks, preprocessors and tokenizers whose
    `backbone_cls` is `backbone_cls`, so that KerasHub's `from_preset` finds
    them for a converted preset.

    Args:
        backbone_cls: A subclass of `keras_hub.models.Backbone`.

    Returns:
        The class `Collaborative<BackboneName>`.
    """
    if issubclass(backbone_cls, CollaborativeBackboneMixin):
        return backbone_cls
    if backbone_cls in _COLLABORATIVE_CLASSES:
        return _COLLABORATIVE_CLASSES[backbone_cls]
    name = f"Collaborative{backbone_cls.__name__}"
    collaborative_cls = _register(
        type(
            name,
            (CollaborativeBackboneMixin, backbone_cls),
            {
                "__module__": __name__,
                "__doc__": f"`{backbone_cls.__name__}` with collaborative "
                "attention layers (see `keras_collab.hub.twins`).",
            },
        )
    )
    _COLLABORATIVE_CLASSES[backbone_cls] = collaborative_cls
    for companion in _companions(backbone_cls):
        # Decoding tasks get the compact collaborative cache.
        mixin = decoding_mixin(companion)
        bases = (companion,) if mixin is None else (mixin, companion)
        twin = type(
            f"Collaborative{companion.__name__}",
            bases,
            {"__module__": __name__, "backbone_cls": collaborative_cls},
        )
        _register(twin)
    return collaborative_cls


def _companions(backbone_cls):
    """Registered tasks, preprocessors and tokenizers of `backbone_cls`."""
    return [
        obj
        for obj in set(keras.saving.get_custom_objects().values())
        if inspect.isclass(obj)
        and getattr(obj, "backbone_cls", None) is backbone_cls
        and not issubclass(obj, keras_hub.models.Backbone)
    ]


def register_all_backbones():
    """Registers collaborative twins of every KerasHub backbone class."""
    for obj in list(keras.saving.get_custom_objects().values()):
        if (
            inspect.isclass(obj)
            and issubclass(obj, keras_hub.models.Backbone)
            and obj is not keras_hub.models.Backbone
            and not issubclass(obj, CollaborativeBackboneMixin)
        ):
            collaborative_backbone_class(obj)


def is_hub_model(model):
    """KerasHub backbones and tasks."""
    return isinstance(model, (keras_hub.models.Backbone, keras_hub.models.Task))


def assemble_hub_model(model, sites, conversions):
    """A new KerasHub backbone or task with the converted layers in place.

    The new model is built from its twin's config, which records the swap,
    so that `save_to_preset` and `from_preset` keep it; every other weight
    is copied from `model`.

    Returns:
        `(new model, {site path: AttentionConversion})`, each conversion's
        `layer` being the one placed in the new model.
    """
    if isinstance(model, keras_hub.models.Task):
        return _assemble_task(model, conversions)
    return _assemble_backbone(model, conversions)


def _assemble_backbone(backbone, conversions):
    collaborative_cls = collaborative_backbone_class(type(backbone))
    config = backbone.get_config()
    config["collaborative_attention"] = {
        path: keras.saving.serialize_keras_object(conversion.layer)
        for path, conversion in conversions.items()
    }
    new_backbone = collaborative_cls.from_config(config)
    placed = {}
    converted_variables = set()
    for path, conversion in conversions.items():
        layer = get_site(new_backbone, path).layer
        for target, source in zip(layer.weights, conversion.layer.weights):
            target.assign(unshared_copy(source))
            converted_variables.add(id(target))
        placed[path] = dataclasses.replace(conversion, layer=layer)
    original_attention_variables = {
        id(w)
        for path in conversions
        for w in get_site(backbone, path).layer.weights
    }
    copy_weights(
        [
            w
            for w in backbone.weights
            if id(w) not in original_attention_variables
        ],
        [w for w in new_backbone.weights if id(w) not in converted_variables],
    )
    return new_backbone, placed


def _assemble_task(task, conversions):
    # Task sites are "<backbone name>/<backbone site path>".
    prefix = f"{task.backbone.name}/"
    outside = [path for path in conversions if not path.startswith(prefix)]
    if outside:
        raise ValueError(
            "Only attention layers inside a task's backbone can be "
            f"converted; these are outside '{task.backbone.name}': {outside}"
        )
    backbone_conversions = {
        path[len(prefix) :]: conversion
        for path, conversion in conversions.items()
    }
    new_backbone, placed = _assemble_backbone(
        task.backbone, backbone_conversions
    )
    task_cls = _collaborative_task_class(type(task), type(new_backbone))
    config = task.get_config()
    config["backbone"] = new_backbone
    config["preprocessor"] = task.preprocessor
    new_task = task_cls.from_config(config)
    _keep_sampler(task, new_task)
    backbone_ids = {id(w) for w in task.backbone.weights}
    new_backbone_ids = {id(w) for w in new_task.backbone.weights}
    copy_weights(
        [w for w in task.weights if id(w) not in backbone_ids],
        [w for w in new_task.weights if id(w) not in new_backbone_ids],
    )
    return new_task, {prefix + path: c for path, c in placed.items()}


def _keep_sampler(task, new_task):
    """A generating task's sampler is compile state, not config: the twin
    gets a copy of the source's, so that `generate()` behaves the same."""
    sampler = getattr(task, "sampler", None)
    if isinstance(sampler, keras_hub.samplers.Sampler):
        config = keras_hub.samplers.serialize(sampler)
        new_task.sampler = keras_hub.samplers.get(config)
        new_task.generate_function = None


def _collaborative_task_class(task_cls, collaborative_backbone_cls):
    for obj in keras.saving.get_custom_objects().values():
        if (
            isinstance(obj, type)
            and issubclass(obj, task_cls)
            and getattr(obj, "backbone_cls", None) is collaborative_backbone_cls
        ):
            return obj
    raise ValueError(
        f"No collaborative twin of task {task_cls.__name__} is registered."
    )


register_all_backbones()
register_assembler(is_hub_model, assemble_hub_model)
