"""Character-level text of Python's standard library, for offline training.

Every Python installation carries a few megabytes of source code: the
top-level modules of the standard library (`os.path.dirname(os.__file__)`),
a corpus that needs no download. Files are taken in sorted order and split
by file, every `VALIDATION_EVERY`-th file going to validation, so that no
validation text was seen in training. The text differs between Python
versions; `corpus_description` records which one was used.

Characters are encoded as ASCII codes (vocabulary of 128); the rare
non-ASCII character becomes `?`.
"""

import dataclasses
import os
import platform
from pathlib import Path

import numpy as np

VOCABULARY_SIZE = 128
VALIDATION_EVERY = 10
# Between files, so that a window spanning two files sees a boundary.
FILE_SEPARATOR = "\n\n"


def stdlib_directory():
    return Path(os.path.dirname(os.__file__))


def source_files(directory=None):
    """The `.py` files directly in the standard library directory, sorted."""
    return sorted((directory or stdlib_directory()).glob("*.py"))


def encode(text):
    """ASCII codes of `text` as `uint8`, non-ASCII characters as `?`."""
    return np.frombuffer(text.encode("ascii", errors="replace"), np.uint8)


def decode(codes):
    return bytes(np.asarray(codes, np.uint8)).decode("ascii")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Encoded training and validation text.

    Attributes:
        train: `uint8` codes of the training files, concatenated.
        validation: `uint8` codes of the validation files, concatenated.
        train_files: Names of the training files.
        validation_files: Names of the validation files.
    """

    train: np.ndarray
    validation: np.ndarray
    train_files: tuple
    validation_files: tuple


def load_corpus(directory=None):
    """Reads and splits the standard library sources (module docstring)."""
    train, validation = [], []
    train_files, validation_files = [], []
    for index, path in enumerate(source_files(directory)):
        text = path.read_text(encoding="utf-8", errors="replace")
        if index % VALIDATION_EVERY == 0:
            validation.append(text)
            validation_files.append(path.name)
        else:
            train.append(text)
            train_files.append(path.name)
    return Corpus(
        train=encode(FILE_SEPARATOR.join(train)),
        validation=encode(FILE_SEPARATOR.join(validation)),
        train_files=tuple(train_files),
        validation_files=tuple(validation_files),
    )


def corpus_description(corpus):
    """JSON-serialisable summary of where the text came from."""
    return {
        "source": str(stdlib_directory()),
        "python": platform.python_version(),
        "train_files": len(corpus.train_files),
        "validation_files": len(corpus.validation_files),
        "train_chars": int(corpus.train.size),
        "validation_chars": int(corpus.validation.size),
    }


def random_windows(codes, seq_len, count, seed):
    """`count` random `(input, next-character target)` windows of `codes`.

    Returns:
        `(inputs, targets)`, both `int32` of shape `(count, seq_len)`;
        `targets` is `inputs` shifted by one character.
    """
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, codes.size - seq_len - 1, size=count)
    return _windows_at(codes, starts, seq_len)


def evenly_spaced_windows(codes, seq_len, count):
    """`count` windows spread evenly over `codes`, the same on every run."""
    starts = np.linspace(0, codes.size - seq_len - 1, count).astype(np.int64)
    return _windows_at(codes, starts, seq_len)


def _windows_at(codes, starts, seq_len):
    offsets = starts[:, None] + np.arange(seq_len + 1)[None, :]
    windows = codes[offsets].astype(np.int32)
    return windows[:, :-1], windows[:, 1:]
