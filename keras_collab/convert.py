"""Conversion of whole models: every attention layer, in one call.

`convert_model` finds the Keras `MultiHeadAttention` layers of a model (KerasHub
subclasses such as `CachedMultiHeadAttention` included), measures what they
see on calibration data, re-parametrizes each into collaborative form
(`keras_collab.conversion`), optionally refines each layer on its real inputs
(`keras_collab.refinement`), and returns a new model. The original is never
modified.
"""

import dataclasses
import time

import keras
import numpy as np

from keras_collab import surgery
from keras_collab.calibration import attention_statistics
from keras_collab.calibration import record_attention_inputs
from keras_collab.conversion import convert_attention
from keras_collab.progress import progress_bar


@dataclasses.dataclass
class ModelConversion:
    """The outcome of `convert_model`.

    Attributes:
        model: The converted model (a new object).
        layers: `{site path: AttentionConversion}` in conversion order; the
            `layer` of each is the one now inside `model`.
        seconds: Wall time of the conversion (calibration, decomposition,
            refinement; model loading excluded).
        refinement: `{site path: {"loss_before", "loss_after"}}` when refined.
        distillation: What `keras_collab.distill` returned, when distilled.
    """

    model: keras.Model
    layers: dict
    seconds: float
    refinement: dict = dataclasses.field(default_factory=dict)
    distillation: dict = dataclasses.field(default_factory=dict)

    @property
    def qk_params_before(self):
        return sum(c.qk_params_before for c in self.layers.values())

    @property
    def qk_params_after(self):
        return sum(c.qk_params_after for c in self.layers.values())


def _batches(calibration_data):
    if calibration_data is None:
        return []
    if isinstance(calibration_data, (list, tuple)):
        return list(calibration_data)
    return [calibration_data]


def _shared_key_dim_for(shared_key_dim, path):
    if isinstance(shared_key_dim, dict):
        if path not in shared_key_dim:
            raise ValueError(
                f"`shared_key_dim` has no entry for attention layer '{path}'. "
                f"Received keys: {sorted(shared_key_dim)}"
            )
        return shared_key_dim[path]
    return shared_key_dim


def collect_statistics(model, sites, calibration_data):
    """Runs `model` eagerly on the calibration batches, recording inputs."""
    layers = {site.path: site.layer for site in sites}
    with record_attention_inputs(layers) as records:
        for batch in _batches(calibration_data):
            model(batch, training=False)
    return attention_statistics(records)


def convert_model(
    model,
    shared_key_dim=None,
    *,
    calibration_data=None,
    target_error=None,
    refine_steps=0,
    refine_learning_rate=1e-3,
    refine_objective="attention",
    distill_steps=0,
    distill_learning_rate=1e-4,
    seed=0,
    tol=1e-6,
    max_iter=300,
    progress=False,
):
    """Converts every multi-head attention layer of a model.

    Args:
        model: A built Keras model: a KerasHub backbone or task, a functional
            or sequential model. It is not modified.
        shared_key_dim: D̃ for every layer: `None` (full size, exact), an
            integer, a fraction of `num_heads * key_dim`, or a mapping from
            site path (see `find_attention_sites`) to one of those.
        calibration_data: Optional batch, or list of batches, that `model`
            accepts. With it the decomposition is activation-aware: it
            minimises the error of each layer's logits on this data.
        target_error: Optional: pick per layer the smallest D̃ whose relative
            (activation-weighted) error is at most this.
        refine_steps: Gradient steps per layer that fit the converted
            layer's attention to the original's on calibration inputs, layer
            after layer (needs `calibration_data`).
        refine_learning_rate: Adam learning rate of the refinement.
        refine_objective: `"attention"` (KL divergence of the attention
            probabilities) or `"output"` (squared error of the layer
            outputs); see `keras_collab.refinement.refine_layer`.
        distill_steps: Adam steps of a final distillation of the whole
            converted model toward the original on the calibration data
            (`keras_collab.distill`: only the collaborative query/key side
            trains; needs `calibration_data`).
        distill_learning_rate: Its learning rate.
        seed: Seed of decomposition and refinement (results are
            deterministic for a given backend).
        tol: Relative improvement under which the decomposition stops.
        max_iter: Maximum decomposition iterations per layer.
        progress: Whether to show a progress bar over layers.

    Returns:
        A `ModelConversion`.

    Example:

    ```python
    backbone = keras_hub.models.BertBackbone.from_preset("bert_base_en")
    result = keras_collab.convert_model(
        backbone, shared_key_dim=0.25, calibration_data=batches
    )
    result.model.save_to_preset("bert_base_collab")
    ```
    """
    start = time.perf_counter()
    sites = surgery.find_attention_sites(model)
    if not sites:
        raise ValueError(
            f"Model '{model.name}' has no keras.layers.MultiHeadAttention "
            "layers to convert."
        )
    if refine_steps and calibration_data is None:
        raise ValueError("`refine_steps` needs `calibration_data`.")
    if distill_steps and calibration_data is None:
        raise ValueError("`distill_steps` needs `calibration_data`.")
    statistics = {}
    if calibration_data is not None:
        statistics = collect_statistics(model, sites, calibration_data)
    conversions = {}
    for site in progress_bar(sites, "Converting attention", progress):
        conversions[site.path] = convert_attention(
            site.layer,
            _shared_key_dim_for(shared_key_dim, site.path),
            calibration=statistics.get(site.path),
            target_error=target_error,
            layer_class=surgery.collaborative_class_for(site.layer),
            seed=seed,
            tol=tol,
            max_iter=max_iter,
        )
    converted = assemble(model, sites, conversions)
    refinement = {}
    if refine_steps:
        from keras_collab.refinement import refine_layers

        refinement = refine_layers(
            model,
            converted.model,
            [site.path for site in sites],
            calibration_data,
            steps=refine_steps,
            learning_rate=refine_learning_rate,
            objective=refine_objective,
            seed=seed,
            progress=progress,
        )
    distillation = {}
    if distill_steps:
        from keras_collab.distillation import distill

        distillation = distill(
            model,
            converted.model,
            calibration_data,
            steps=distill_steps,
            learning_rate=distill_learning_rate,
            seed=seed,
            progress=progress,
        )
    return ModelConversion(
        model=converted.model,
        layers=converted.layers,
        seconds=time.perf_counter() - start,
        refinement=refinement,
        distillation=distillation,
    )


@dataclasses.dataclass
class _Assembled:
    model: keras.Model
    layers: dict


def assemble(model, sites, conversions):
    """A new model with the converted layers in place of the sites."""
    hub = _hub()
    if hub is not None and hub.is_task(model):
        return _assemble_task(model, conversions)
    if hub is not None and hub.is_backbone(model):
        return _assemble_backbone(model, conversions)
    if surgery.is_plain_graph_model(model) and all(
        site.owner is None for site in sites
    ):
        replacements = {
            site.path: conversions[site.path].layer for site in sites
        }
        return _Assembled(
            surgery.rebuild_graph_model(model, replacements), conversions
        )
    raise ValueError(
        f"Cannot rebuild a model of type {type(model).__name__}: "
        "convert_model supports KerasHub backbones and tasks and plain "
        "functional or sequential models whose attention layers are nodes "
        "of the graph. For other models, convert layers one by one with "
        "keras_collab.conversion.convert_attention."
    )


def _hub():
    try:
        from keras_collab import hub
    except ImportError:
        return None
    return hub


def _assemble_backbone(backbone, conversions):
    hub = _hub()
    collaborative_cls = hub.collaborative_backbone_class(type(backbone))
    config = backbone.get_config()
    config["collaborative_attention"] = {
        path: keras.saving.serialize_keras_object(conversion.layer)
        for path, conversion in conversions.items()
    }
    new_backbone = collaborative_cls.from_config(config)
    placed = {}
    converted_variables = set()
    for path, conversion in conversions.items():
        layer = surgery.get_site(new_backbone, path).layer
        for target, source in zip(layer.weights, conversion.layer.weights):
            target.assign(_copy_of(source))
            converted_variables.add(id(target))
        placed[path] = dataclasses.replace(conversion, layer=layer)
    original_attention_variables = {
        id(w)
        for path in conversions
        for w in surgery.get_site(backbone, path).layer.weights
    }
    _copy_weights(
        [w for w in backbone.weights if id(w) not in original_attention_variables],
        [w for w in new_backbone.weights if id(w) not in converted_variables],
    )
    return _Assembled(new_backbone, placed)


def _assemble_task(task, conversions):
    backbone_sites = surgery.find_attention_sites(task.backbone)
    by_layer = {id(site.layer): site.path for site in backbone_sites}
    task_sites = surgery.find_attention_sites(task)
    # Paths were found on the task; re-key them relative to the backbone.
    backbone_conversions = {
        by_layer[id(site.layer)]: conversions[site.path] for site in task_sites
    }
    assembled = _assemble_backbone(task.backbone, backbone_conversions)
    task_cls = _collaborative_task_class(type(task), type(assembled.model))
    config = task.get_config()
    config["backbone"] = assembled.model
    config["preprocessor"] = task.preprocessor
    new_task = task_cls.from_config(config)
    backbone_ids = {id(w) for w in task.backbone.weights}
    new_backbone_ids = {id(w) for w in new_task.backbone.weights}
    _copy_weights(
        [w for w in task.weights if id(w) not in backbone_ids],
        [w for w in new_task.weights if id(w) not in new_backbone_ids],
    )
    task_paths = {id(s.layer): s.path for s in task_sites}
    layers = {
        task_paths[id(site.layer)]: assembled.layers[site.path]
        for site in backbone_sites
    }
    return _Assembled(new_task, layers)


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


def _copy_of(variable):
    """A value that shares no buffer with `variable`.

    JAX arrays are immutable and `assign` would share the buffer; training
    the new model donates its buffers, which would delete the source's.
    """
    return np.array(keras.ops.convert_to_numpy(variable))


def _copy_weights(sources, targets):
    """Assigns `sources` to `targets`, matched by variable path.

    Falls back to order when paths are not unique, and checks shapes either
    way, so that a mismatch fails loudly instead of corrupting the model.
    """
    if len(sources) != len(targets):
        raise ValueError(
            f"Cannot copy {len(sources)} weights into {len(targets)}."
        )
    source_paths = [w.path for w in sources]
    target_paths = [w.path for w in targets]
    if len(set(source_paths)) == len(sources) and set(source_paths) == set(
        target_paths
    ):
        by_path = {w.path: w for w in sources}
        pairs = [(by_path[t.path], t) for t in targets]
    else:
        pairs = list(zip(sources, targets))
    for source, target in pairs:
        if tuple(source.shape) != tuple(target.shape):
            raise ValueError(
                f"Weight {source.path} has shape {source.shape}, its copy "
                f"{target.path} has {target.shape}."
            )
        target.assign(_copy_of(source))

