"""Calibration: what attention layers see on real inputs.

Activation-aware conversion weights the decomposition of each attention layer
by the second moments of that layer's actual query and key inputs, and the
optional refinement trains each converted layer on those inputs. This module
records them, and ships a calibration corpus that needs no download: sentences
from the docstrings of Python's standard library, read at run time.
"""

import contextlib
import importlib
import inspect
import random
import re

import keras
import numpy as np

from keras_collab.conversion import AttentionStatistics
from keras_collab.decomposition import second_moment

# Standard-library modules with long, well-written English docstrings.
# `inspect` is left out: PyTorch replaces some of its functions at import.
_CORPUS_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fractions", "functools",
    "gettext", "heapq", "http.client", "http.server", "imaplib",
    "ipaddress", "json", "logging", "mailbox", "multiprocessing", "pathlib",
    "pickle", "pydoc", "queue", "random", "sched", "shutil", "smtplib",
    "socket", "socketserver", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "typing", "unittest", "urllib.parse", "urllib.request",
    "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
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


@contextlib.contextmanager
def record_attention_inputs(layers):
    """Records the inputs of attention layers while a model runs eagerly.

    Temporarily wraps each layer's `call` (restored on exit, whatever
    happens) and appends, for each call, the query, the key input and the
    attention mask as NumPy arrays.

    Args:
        layers: `{key: attention layer}`.

    Yields:
        `{key: list of (query, key, mask-or-None)}`, filled as the model runs.
    """
    records = {key: [] for key in layers}
    patched = []

    def wrap(key, original):
        signature = inspect.signature(original)

        def call(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            key_input = arguments.get("key")
            if key_input is None:
                key_input = arguments["value"]
            mask = arguments.get("attention_mask")
            records[key].append(
                (
                    keras.ops.convert_to_numpy(arguments["query"]),
                    keras.ops.convert_to_numpy(key_input),
                    None
                    if mask is None
                    else keras.ops.convert_to_numpy(mask).astype(bool),
                )
            )
            return original(*args, **kwargs)

        return call

    try:
        for key, layer in layers.items():
            original = layer.call
            object.__setattr__(layer, "call", wrap(key, original))
            patched.append(layer)
        yield records
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")


def token_validity(query, key, mask):
    """Boolean (N, T) and (N, S) arrays marking real query and key tokens."""
    batch, queries, keys = query.shape[0], query.shape[1], key.shape[1]
    if mask is None:
        return np.ones((batch, queries), bool), np.ones((batch, keys), bool)
    mask = np.broadcast_to(mask, (batch, queries, keys))
    key_valid = mask.any(axis=1)
    if queries == keys:
        # Self-attention: a padded query is a padded key of the same position.
        return key_valid, key_valid
    return mask.any(axis=2), key_valid


def attention_statistics(records):
    """Second moments of recorded inputs, per attention layer.

    The query side uses the plain second moment; the key side is centred per
    sequence, since a shift shared by every key of a sequence only adds a
    per-query constant to the logits, which softmax cancels.

    Args:
        records: `{key: list of (query, key, mask)}` from
            `record_attention_inputs`.

    Returns:
        `{key: AttentionStatistics}`.
    """
    statistics = {}
    for name, calls in records.items():
        if not calls:
            continue
        query_sum = key_sum = 0.0
        query_tokens = key_tokens = 0
        for query, key, mask in calls:
            query_valid, key_valid = token_validity(query, key, mask)
            q_count, k_count = int(query_valid.sum()), int(key_valid.sum())
            query_sum = query_sum + q_count * second_moment(query, query_valid)
            key_sum = key_sum + k_count * second_moment(
                key, key_valid, center_per_sequence=True
            )
            query_tokens += q_count
            key_tokens += k_count
        statistics[name] = AttentionStatistics(
            query_moment=query_sum / max(query_tokens, 1),
            key_moment=key_sum / max(key_tokens, 1),
            tokens=query_tokens,
        )
    return statistics
