"""Attention sites: where attention layers sit in a model, and their swap.

Two kinds of models hold attention layers differently:

* KerasHub backbones (and any layer tree) keep them as attributes of other
  layers, e.g. `TransformerEncoder._self_attention_layer`. They are found by
  walking the layer tree and replaced by re-assigning the attribute; KerasHub
  backbones are rebuilt through `keras_collab.hub` so that the swap is part
  of their config and survives `save_to_preset`/`from_preset`.
* Plain functional and sequential Keras models hold them as nodes of their
  graph. They are replaced by cloning the graph (`keras.models.clone_model`).

Sites are addressed by a path of layer names and attribute names joined by
"/", e.g. `"transformer_layer_0/_self_attention_layer"`, stable across
`get_config`/`from_config`.
"""

import dataclasses

import keras

from keras_collab.layers._keras_compat import Functional


@dataclasses.dataclass
class AttentionSite:
    """Where an attention layer sits in a model.

    Attributes:
        path: `"<owner path>/<attribute>"` for attribute sites,
            `"<layer name>"` for graph nodes of functional models.
        layer: The attention layer.
        owner: The layer holding it as an attribute, or `None` for a graph
            node.
        attribute: The attribute name on `owner`, or `None`.
    """

    path: str
    layer: keras.layers.Layer
    owner: keras.layers.Layer = None
    attribute: str = None


# Keras' own bookkeeping holds every sublayer a second time; skip it so each
# layer is reached through the attribute its owner's code uses.
_INTERNAL_ATTRIBUTES = frozenset(
    {"_layers", "_operations", "_tracker", "_inbound_nodes", "_outbound_nodes"}
)


def _children(layer):
    """(path fragment, sublayer) pairs of the layers `layer` holds by name.

    Looks in lists too (`TransformerEncoder`s of a backbone) and, on the torch
    backend, in `_modules`, where `torch.nn.Module` keeps sublayers.
    """
    attributes = {**vars(layer), **vars(layer).get("_modules", {})}
    for attribute, value in attributes.items():
        if attribute in _INTERNAL_ATTRIBUTES or value is layer:
            continue
        if isinstance(value, keras.layers.Layer):
            yield attribute, value
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                if isinstance(item, keras.layers.Layer):
                    yield f"{attribute}/{index}", item


def find_attention_sites(model, predicate):
    """Lists the attention layers of `model`, each once.

    A layer shared by several owners (ALBERT reuses one encoder block for
    every layer) is listed once. Layers of a functional model (a KerasHub
    backbone, or one nested in a task) are visited in graph order and named
    by their (unique) layer names; other layers by the attributes that hold
    them.

    Args:
        model: A Keras model or layer.
        predicate: Which layers count as sites, e.g.
            `keras_collab.conversion.is_convertible`.

    Returns:
        A list of `AttentionSite`.
    """
    sites = []
    seen = {id(model)}

    def visit(layer, prefix):
        if _is_graph(layer):
            children = [(node.name, node) for node in layer.layers]
        else:
            children = list(_children(layer))
        for fragment, child in children:
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}/{fragment}" if prefix else fragment
            if not predicate(child):
                visit(child, path)
            elif _is_graph(layer):
                # A node of the graph, not an attribute.
                sites.append(AttentionSite(path, child))
            else:
                sites.append(AttentionSite(path, child, layer, fragment))

    visit(model, "")
    return sites


def _is_graph(model):
    """Functional and sequential models, KerasHub backbones included (they
    subclass `Functional`): their layers are nodes, named uniquely."""
    return isinstance(model, (Functional, keras.Sequential))


def is_plain_graph_model(model):
    """Plain functional/sequential models, whose graph can be cloned."""
    return type(model) in (Functional, keras.Sequential)


def get_site(model, path):
    """Resolves a path produced by `find_attention_sites`."""
    owner = model
    names = path.split("/")
    for name in names[:-1]:
        owner = _child(owner, name)
    name = names[-1]
    if _is_graph(owner):
        return AttentionSite(path, owner.get_layer(name))
    if name.isdigit():
        raise ValueError(f"Attention site '{path}' is a list item.")
    return AttentionSite(path, getattr(owner, name), owner, name)


def _child(owner, name):
    if _is_graph(owner):
        return owner.get_layer(name)
    if name.isdigit():
        return owner[int(name)]
    return getattr(owner, name)


def replace_attribute(site, new_layer):
    """Makes `site.owner` use `new_layer` instead of `site.layer`.

    The old layer is untracked, so its weights leave the model. Keras locks
    a built layer's state; the swap is the one sanctioned change, so the
    owner is unlocked for it and locked again.
    """
    owner = site.owner
    tracker = owner._tracker
    was_locked = tracker.locked
    tracker.unlock()
    try:
        tracker.untrack(site.layer)
        delattr(owner, site.attribute)
        setattr(owner, site.attribute, new_layer)
    finally:
        if was_locked:
            tracker.lock()


def rebuild_graph_model(model, replacements):
    """Clones a functional/sequential model with some layers replaced.

    Args:
        model: A plain `keras.Model` (functional) or `keras.Sequential`.
        replacements: `{layer name: new built layer}`.

    Returns:
        The new model. Layers not replaced are cloned from their config and
        get the original's weights; the original model is left untouched.
    """

    def clone(layer):
        if layer.name in replacements:
            return replacements[layer.name]
        return layer.__class__.from_config(layer.get_config())

    new_model = keras.models.clone_model(model, clone_function=clone)
    for old_layer, new_layer in zip(model.layers, new_model.layers):
        if old_layer.name not in replacements:
            new_layer.set_weights(old_layer.get_weights())
    return new_model
