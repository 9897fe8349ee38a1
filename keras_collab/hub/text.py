"""Text for calibration and evaluation, and its encoding into batches.

The built-in corpus needs no download: English sentences from the
docstrings of Python's standard library, read at run time. `encode` turns
texts into the backbone inputs of a KerasHub preprocessor, batched by
length and trimmed to their longest text. An encoder-decoder reads each
text as both its encoder text and its decoder text, so that the
self-attention of both stacks and the cross-attention all see real text.
"""

import importlib
import inspect
import random
import re

import keras
import numpy as np

from keras_collab.hub.sources import is_seq2seq

# Standard-library modules with long, well-written English docstrings.
# `inspect` is left out: PyTorch replaces some of its functions at import.
_CORPUS_MODULES = (
    "argparse",
    "asyncio",
    "calendar",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "heapq",
    "http.client",
    "http.server",
    "imaplib",
    "ipaddress",
    "json",
    "logging",
    "mailbox",
    "multiprocessing",
    "pathlib",
    "pickle",
    "pydoc",
    "queue",
    "random",
    "sched",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _defined_in(member, module):
    """Whether `member` is the module's own, not a replacement patched in.

    Some libraries (PyTorch) replace standard-library functions at import;
    their docstrings must not leak in, or the corpus would depend on what
    else is imported.
    """
    if getattr(member, "__module__", None) != module.__name__:
        return False
    code = getattr(member, "__code__", None)
    return code is None or code.co_filename == getattr(module, "__file__", None)


def _docstrings(module):
    yield inspect.getdoc(module) or ""
    for _, member in inspect.getmembers(module):
        if not _defined_in(member, module):
            continue
        if inspect.isclass(member) or inspect.isfunction(member):
            yield inspect.getdoc(member) or ""
            if inspect.isclass(member):
                for _, method in inspect.getmembers(member, inspect.isfunction):
                    yield inspect.getdoc(method) or ""


def _sentences(text):
    # Paragraphs first: docstrings wrap lines inside a sentence.
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(flat):
            words = sentence.split()
            if (
                8 <= len(words) <= 40
                and sentence[0].isupper()
                and sentence.endswith(".")
                and sentence.isascii()
                and not any(c in sentence for c in "{}[]<>=|\\")
            ):
                yield sentence


def builtin_corpus(count=None, seed=0):
    """English sentences from the standard library's docstrings.

    Deterministic for a given Python version: modules are read in a fixed
    order, duplicates dropped, and the result shuffled with `seed`.

    Args:
        count: How many sentences to return (all when `None`).
        seed: Seed of the shuffle.

    Returns:
        A list of strings.

    Example:

    >>> sentences = builtin_corpus(4)
    >>> len(sentences)
    4
    """
    seen, corpus = set(), []
    for name in _CORPUS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a trimmed Python build may lack a module
            continue
        for doc in _docstrings(module):
            for sentence in _sentences(doc):
                if sentence not in seen:
                    seen.add(sentence)
                    corpus.append(sentence)
    random.Random(seed).shuffle(corpus)
    return corpus if count is None else corpus[:count]


def calibration_and_held_out(samples, calibration_file=None, held_out=64):
    """Calibration texts, and held-out texts never used for calibration.

    Args:
        samples: How many calibration texts.
        calibration_file: Optional text file, one calibration text per line;
            by default the first `samples` sentences of `builtin_corpus()`.
        held_out: How many held-out texts: sentences of the built-in corpus
            that are not calibration texts (those after the calibration
            block, with the built-in corpus).

    Returns:
        `(calibration texts, held-out texts)`.
    """
    corpus = builtin_corpus()
    if calibration_file:
        calibration = read_texts(calibration_file)[:samples]
        used = set(calibration)
        evaluation = [text for text in corpus if text not in used]
        return calibration, evaluation[:held_out]
    return corpus[:samples], corpus[samples : samples + held_out]


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
    matching = [
        (len(p), m) for p, m in zip(prefixes, masks) if key.startswith(p)
    ]
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
