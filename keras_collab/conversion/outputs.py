"""Which output of a model is compared with the original's, and which
padding mask weighs its tokens.

Distillation trains on this output and fidelity measures it. A KerasHub
backbone returns a dict: its token features are `sequence_output`, or for an
encoder-decoder `decoder_sequence_output`, which depends on every attention
layer (encoder, decoder and cross-attention). A single-output model (a task,
a functional model) is compared on that output.
"""

# In order of preference.
PREFERRED_OUTPUTS = ("sequence_output", "decoder_sequence_output")
_SEQUENCE_OUTPUT = "sequence_output"
_PADDING_MASK = "padding_mask"


def main_output_name(outputs):
    """The name of the compared output in a dict of outputs."""
    for name in PREFERRED_OUTPUTS:
        if name in outputs:
            return name
    if len(outputs) == 1:
        return next(iter(outputs))
    raise ValueError(
        "Cannot tell which output to compare among "
        f"{sorted(outputs)}; expected one of {list(PREFERRED_OUTPUTS)}."
    )


def select_output(outputs):
    """The compared output of whatever a model returned."""
    if isinstance(outputs, dict):
        return outputs[main_output_name(outputs)]
    if isinstance(outputs, (list, tuple)):
        if len(outputs) == 1:
            return outputs[0]
        raise ValueError(
            f"Cannot tell which of the model's {len(outputs)} outputs to "
            "compare."
        )
    return outputs


def mask_name(output_name):
    """The padding mask of an output's tokens: `X_padding_mask` for
    `X_sequence_output`, `padding_mask` for anything else.

    Example:

    >>> mask_name("decoder_sequence_output")
    'decoder_padding_mask'
    >>> mask_name("sequence_output")
    'padding_mask'
    """
    if output_name and output_name.endswith(_SEQUENCE_OUTPUT):
        return output_name[: -len(_SEQUENCE_OUTPUT)] + _PADDING_MASK
    return _PADDING_MASK
