"""What refinement and distillation share: a model that trains in inference
mode, and a context in which only the weights a conversion approximated are
trainable."""

import contextlib

import keras


class InferenceModeModel(keras.Model):
    """Runs `function(wrapped, inputs)` with `training=False` inside `fit`.

    `fit` calls its model with `training=True`, which reaches every layer (a
    `training=False` recorded in a functional graph does not survive it);
    attention dropout would then make the student's outputs noisy copies of
    what the teacher's targets were computed without. `function` passes
    `training=False` explicitly, inside `call`, which keeps dropout off
    while the weights train.

    Args:
        wrapped: The layer or model whose weights train; tracked, so that
            its variables are this model's.
        function: `function(wrapped, inputs)` returns the trained output and
            must call `wrapped` with `training=False`.
        name: Model name (TensorFlow rejects names that start with "_").
    """

    def __init__(self, wrapped, function, name, **kwargs):
        super().__init__(name=name, **kwargs)
        self.wrapped = wrapped
        self._function = function

    def call(self, inputs):
        return self._function(self.wrapped, inputs)

    def zero_grad(self, set_to_none=True):
        """Clears the gradients of every trainable variable (PyTorch only:
        its trainer calls this before each backward pass).

        `torch.nn.Module.zero_grad` reaches only the Parameters that the
        layers registered, keyed by variable path, when they were built: a
        variable whose path another one shares, or that was swapped in
        later, is missed, and its gradient then adds up over the steps of
        `fit`; Adam follows the stale sum and the loss rises.
        """
        super().zero_grad(set_to_none=set_to_none)
        for variable in self.trainable_weights:
            variable.value.grad = None


def approximated_variables(layer, value_side=True):
    """The variables of a collaborative layer that a conversion
    approximated: its `query_key_variables`, and with shared values
    (`value_side` and `shared_value_dim` set) its `value_output_variables`.
    Per-head values and the output projection are exact copies."""
    variables = list(layer.query_key_variables)
    if value_side and getattr(layer, "shared_value_dim", None):
        variables += layer.value_output_variables
    return variables


@contextlib.contextmanager
def only_approximated_trainable(model, layers, value_side=True):
    """Inside the context, only the `approximated_variables` of `layers`
    (collaborative layers inside `model`) are trainable; every layer's
    `trainable` flag is restored on exit, whatever happens.

    Yields:
        The trainable variables, checked to be exactly those.

    Raises:
        RuntimeError: if another variable stayed trainable.
    """
    flattened = list(model._flatten_layers(include_self=True))
    saved = [(layer, layer.trainable) for layer in flattened]
    frozen_variables = []
    try:
        for layer in flattened:
            # Leaf layers own the weights; containers stay trainable so that
            # the collaborative layers below them can be unfrozen. Setting a
            # container's flag also sets its sublayers', so containers come
            # first in this (top-down) order.
            leaf = not list(layer._flatten_layers(include_self=False))
            layer.trainable = not leaf
        expected = {}
        for layer in layers:
            for sublayer in layer._flatten_layers(include_self=False):
                sublayer.trainable = False
            layer.query_dense.trainable = True
            layer.key_dense.trainable = True
            approximated = approximated_variables(layer, value_side)
            if len(approximated) > len(layer.query_key_variables):
                layer.value_dense.trainable = True
                layer.output_dense.trainable = True
                if getattr(layer, "_gate_dense", None) is not None:
                    layer._gate_dense.trainable = True
            for variable in approximated:
                expected[id(variable)] = variable
            frozen_variables += _freeze_own_variables(layer, expected)
        trainable = model.trainable_weights
        unexpected = [v.path for v in trainable if id(v) not in expected]
        if unexpected:
            raise RuntimeError(
                "Could not freeze everything but the approximated "
                f"collaborative weights; still trainable: {unexpected}"
            )
        yield trainable
    finally:
        for variable in frozen_variables:
            variable.trainable = True
        for layer, trainable in reversed(saved):
            layer.trainable = trainable


def _freeze_own_variables(layer, expected):
    """Freezes the trainable weights that `layer` owns itself (not through
    a sublayer) and `expected` leaves out, such as the value mixing of
    shared values when only the query/key side trains; returns them."""
    frozen = []
    for variable in layer._trainable_variables:
        if variable.trainable and id(variable) not in expected:
            variable.trainable = False
            frozen.append(variable)
    return frozen
