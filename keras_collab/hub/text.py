"""Text for calibration and evaluation, and its encoding into batches.

The built-in corpus needs no download. `builtin_corpus` reads English
sentences from the docstrings of Python's standard library at run time;
`calibration_and_held_out` draws calibration and held-out texts from the
several domains of `keras_collab.hub.corpus`; `vocabulary_texts` adds texts
of random words from a model's own vocabulary. `encode` turns
texts into the backbone inputs of a KerasHub preprocessor, batched by
length and trimmed to their longest text. An encoder-decoder reads each
text as both its encoder text and its decoder text, so that the
self-attention of both stacks and the cross-attention all see real text.
"""

import re

import keras
import numpy as np

from keras_collab.hub import corpus
from keras_collab.hub.corpus import builtin_corpus  # noqa: F401
from keras_collab.hub.sources import is_seq2seq


def calibration_and_held_out(samples, calibration_file=None, held_out=64):
    """Calibration texts, and held-out texts of other domains.

    The domain split is `keras_collab.hub.corpus`'s: calibration texts come
    from `CALIBRATION_DOMAINS`, held-out texts from `HELD_OUT_DOMAINS`,
    which calibration, refinement and distillation never see.

    Args:
        samples: How many calibration texts.
        calibration_file: Optional text file, one calibration text per line;
            by default the first `samples` texts of
            `corpus.calibration_texts()` (every calibration domain in turn).
        held_out: How many held-out texts in all, the same number from each
            held-out domain (see `held_out_by_domain`), taken in turn.
            Texts of the calibration file are left out.

    Returns:
        `(calibration texts, held-out texts)`.
    """
    calibration = calibration_texts(samples, calibration_file)
    by_domain = held_out_by_domain(held_out, exclude=calibration)
    return calibration, _in_turn(list(by_domain.values()))


def calibration_texts(samples, calibration_file=None):
    """The first `samples` lines of `calibration_file`, or by default the
    first `samples` texts of `corpus.calibration_texts()`."""
    if calibration_file:
        return read_texts(calibration_file)[:samples]
    return corpus.calibration_texts(samples)


# Markers that byte-pair and SentencePiece vocabularies put on a token that
# starts a word ("Ġword", "▁word").
_WORD_START_MARKERS = ("Ġ", "▁")
_PLAIN_WORD = re.compile(r"[A-Za-z]{2,}")


def vocabulary_words(tokenizer):
    """The whole, plain words of a KerasHub tokenizer's vocabulary, sorted.

    A word is two or more ASCII letters. When the vocabulary marks the
    tokens that start a word (byte-pair and SentencePiece vocabularies),
    only those count, without their marker; WordPiece continuations
    (`"##ing"`) and special tokens are never words. A character-level
    vocabulary has none.
    """
    vocabulary = tokenizer.get_vocabulary()
    marked = [t[1:] for t in vocabulary if t.startswith(_WORD_START_MARKERS)]
    candidates = marked or vocabulary
    return sorted({w for w in candidates if _PLAIN_WORD.fullmatch(w)})


def vocabulary_texts(tokenizer, count, seed=0, words_per_text=(8, 24)):
    """`count` texts of words drawn uniformly from the tokenizer's
    vocabulary (`vocabulary_words`), for calibration.

    A corpus of a few hundred sentences uses a few thousand of the tens of
    thousands of words a model knows, and an activation-aware conversion
    fits the directions those words excite. Text of another domain brings
    other words. Texts of random vocabulary words, beside the corpus, show
    every layer inputs from words the corpus lacks.

    Args:
        tokenizer: A KerasHub tokenizer with `get_vocabulary()`.
        count: How many texts; 0 gives none.
        seed: Seed of the draw; the same seed gives the same texts.
        words_per_text: `(low, high)`: each text has from `low` to
            `high - 1` words, about the length of a corpus sentence.

    Returns:
        A list of `count` strings.

    Raises:
        ValueError: if `count` is negative, or positive while the
            vocabulary has no plain word.
    """
    if count < 0:
        raise ValueError(f"`count` must be >= 0. Received: {count}")
    if count == 0:
        return []
    words = vocabulary_words(tokenizer)
    if not words:
        raise ValueError(
            "The tokenizer's vocabulary has no plain word (two or more "
            "ASCII letters) to build vocabulary texts from; a "
            "character-level vocabulary has none."
        )
    rng = np.random.default_rng(seed)
    lengths = rng.integers(*words_per_text, size=count)
    return [" ".join(rng.choice(words, size=n)) for n in lengths]


def held_out_by_domain(total, exclude=()):
    """`{held-out domain: texts}`, `total // len(HELD_OUT_DOMAINS)` of each
    (see `keras_collab.hub.corpus`), without the texts of `exclude`."""
    domains = corpus.HELD_OUT_DOMAINS
    per_domain = total // len(domains)
    if per_domain < 1:
        raise ValueError(
            f"Need at least {len(domains)} held-out texts, one per held-out "
            f"domain {domains}. Received: {total}"
        )
    excluded = set(exclude)
    pools = corpus.held_out_texts(per_domain + len(excluded), domains)
    return {
        name: [t for t in texts if t not in excluded][:per_domain]
        for name, texts in pools.items()
    }


def _in_turn(lists):
    """The items of `lists`, one of each in turn."""
    longest = max((len(items) for items in lists), default=0)
    return [
        items[i] for i in range(longest) for items in lists if i < len(items)
    ]


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
