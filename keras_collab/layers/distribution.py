"""Layouts of collaborative attention weights for `keras.distribution`.

`get_layout_map` gives the `keras.distribution.LayoutMap` that splits the
heads of every collaborative attention layer over the model axis of a device
mesh, for `keras.distribution.ModelParallel` (Keras implements it on JAX).
"""

import keras


def get_layout_map(
    device_mesh,
    model_axis="model",
    data_axis="batch",
    shared_values=False,
    layout_map=None,
):
    """A `keras.distribution.LayoutMap` for collaborative attention weights.

    Heads are split over `model_axis`, as Megatron-style tensor parallelism
    splits the heads of Keras' `MultiHeadAttention`; each device computes
    the attention of its heads only. The weights, by path (any layer), and
    their layouts:

    ```
    mixing                  (H, D̃)           (model, None)
    content_bias            (D_k, H)         (None, model)
    value/kernel            (D_v, H, d_v)    (data, model, None)
    value/bias              (H, d_v)         (model, None)
    gate/kernel             (D_q, H, d)      (data, model, None)
    gate/bias               (H, d)           (model, None)
    attention_output/kernel (H, d_v, D)      (model, None, data)
    query/*, key/kernel     (D, D̃)           replicated
    ```

    The shared query and key projections W̃_Q, W̃_K are read by every head:
    they are replicated, as the single key/value head of multi-query
    attention is, and each device computes Q̃ and K̃ (cheap: `D × D̃` each).
    Splitting D̃ over the model axis instead would leave every device with
    a partial sum of each head's logits `Q̃ diag(m_i) K̃ᵀ`, so each layer
    would all-reduce the `(B, H, T, S)` logits, the largest tensor of
    attention; split by heads, the only collective is the all-reduce of
    the `(B, T, D)` output that the output projection sums over heads (and
    that tensor parallel attention always pays).

    With shared values (`shared_value_dim`, `shared_values=True`) the value
    projection `value/kernel (D_v, D̃_v)` and the output projection
    `attention_output/kernel (D̃_v, D)` are shared by all heads and
    replicated too; their per-head mixing `value_mixing (H, D̃_v)` is split
    by heads `(model, None)`, and the heads' contexts are summed (an
    all-reduce of the `(B, T, D̃_v)` mixed context) before the output
    projection.

    As in KerasHub's `LlamaBackbone.get_layout_map`, the model-width axis of
    the per-head kernels (`D_v`, `D_q`, `D`) is also split over `data_axis`
    (fully sharded data parallelism: XLA gathers those weights where they
    are used); `data_axis=None` replicates them over the data axis.

    Rules match paths ending in these names in any layer, so the per-head
    rules also fit the value, output and gate weights of Keras
    `MultiHeadAttention` layers left unconverted in the same model (their
    query/key kernels stay replicated). Other weights get no rule and are
    replicated. `H` must be a multiple of the mesh's `model_axis` size, and
    the model widths of `data_axis`'s size.

    Args:
        device_mesh: A `keras.distribution.DeviceMesh`.
        model_axis: The name of the mesh axis the heads are split over.
        data_axis: The name of the mesh axis the batch is split over, or
            `None` to replicate the weights over it.
        shared_values: Whether the layers use shared values
            (`shared_value_dim` set); their value and output weights have
            other shapes. Layouts are looked up by path, not shape, so one
            map cannot serve both kinds.
        layout_map: A `keras.distribution.LayoutMap` on `device_mesh` to add
            the rules to (e.g. the feed-forward and embedding rules of a
            backbone); by default a new one.

    Returns:
        The `keras.distribution.LayoutMap`.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh(
        (2, 4), ("batch", "model"), keras.distribution.list_devices()
    )
    distribution = keras.distribution.ModelParallel(
        layout_map=keras_collab.get_layout_map(mesh), batch_dim_name="batch"
    )
    with distribution.scope():
        backbone = keras_hub.models.Backbone.from_preset("converted_preset")
    ```
    """
    _check_axes(device_mesh, model_axis, data_axis)
    if layout_map is None:
        layout_map = keras.distribution.LayoutMap(device_mesh)
    elif layout_map.device_mesh is not device_mesh:
        raise ValueError(
            "`layout_map` is on another device mesh than `device_mesh`."
        )
    heads, width = model_axis, data_axis
    layout_map[r".*/mixing"] = (heads, None)
    layout_map[r".*/content_bias"] = (None, heads)
    layout_map[r".*/gate/kernel"] = (width, heads, None)
    layout_map[r".*/gate/bias"] = (heads, None)
    if shared_values:
        layout_map[r".*/value_mixing"] = (heads, None)
    else:
        layout_map[r".*/value/kernel"] = (width, heads, None)
        layout_map[r".*/value/bias"] = (heads, None)
        layout_map[r".*/attention_output/kernel"] = (heads, None, width)
    return layout_map


def _check_axes(device_mesh, model_axis, data_axis):
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            "`device_mesh` must be a `keras.distribution.DeviceMesh`. "
            f"Received: {type(device_mesh).__name__}"
        )
    if model_axis is None:
        raise ValueError("`model_axis` must name an axis of the device mesh.")
    for argument, axis in (
        ("model_axis", model_axis),
        ("data_axis", data_axis),
    ):
        if axis is not None and axis not in device_mesh.axis_names:
            raise ValueError(
                f"`{argument}` '{axis}' is not an axis of the device mesh, "
                f"whose axes are {list(device_mesh.axis_names)}."
            )
    if model_axis == data_axis:
        raise ValueError(
            f"`model_axis` and `data_axis` are both '{model_axis}'; they "
            "must be different axes of the mesh."
        )
