"""A GPT-2-style character language model in KerasHub, and its preset.

KerasHub's own `GPT2Backbone` and `GPT2CausalLM`, trained from scratch on
the standard library sources (`benchmarks.workloads.stdlib_text`), one
token per character: no pretrained GPT-2 can be downloaded here, and a
model that has learnt something uses its attention, which a random one
barely does.

The tokenizer is a real `GPT2Tokenizer`, so that the preset saves and
reloads through KerasHub (`Tokenizer.from_preset`,
`CausalLMPreprocessor.from_preset`, `CausalLM.from_preset`) like any
GPT-2 preset. Its vocabulary is GPT-2's 256 byte-level characters, token id
= byte value (ASCII text tokenizes to its ASCII codes, the codes of
`stdlib_text.encode`), then `<|endoftext|>` (256, GPT-2's start and end
token). KerasHub cannot build a byte-pair tokenizer without merges (its
TensorFlow lookup table of merges fails when empty), so there is one merge,
of a pair that never occurs in UTF-8 text: an ASCII letter then a
continuation byte (0x80). Its result is token 257, which no text
tokenizes to. Every character is one token.

Text splits, by file as in `stdlib_text`: the training files; every
`VALIDATION_EVERY`-th file is held out, and the held-out files alternate
between `validation` (the loss curve of training) and `test` (what the
`decoder_quality` suite evaluates conversions on, seen by nothing else).

This module imports Keras and KerasHub: import it only once `KERAS_BACKEND`
is set.
"""

import contextlib
import dataclasses
import json
import math
import os
import time

import keras
import keras_hub
import numpy as np
from keras_hub.src.tokenizers.byte_pair_tokenizer import bytes_to_unicode

from benchmarks.harness.result_files import write_json
from benchmarks.workloads import char_lm
from benchmarks.workloads import stdlib_text
from keras_collab.hub.preset_files import atomic_directory

# Written next to the preset's own files: how it was trained.
TRAINING_FILE = "char_gpt2_training.json"
END_TOKEN = "<|endoftext|>"
END_TOKEN_ID = 256
# The result of the one merge rule; no text tokenizes to it.
UNREACHABLE_TOKEN_ID = 257
VOCABULARY_SIZE = 258


def char_vocabulary_and_merges():
    """`(vocabulary, merges)` of the character-level `GPT2Tokenizer`.

    Token id = byte value for GPT-2's byte-level characters; see the module
    docstring for the end token and the one (never applicable) merge.
    """
    byte_values, characters = bytes_to_unicode()
    character_of = {b[0]: c for b, c in zip(byte_values, characters)}
    vocabulary = {character_of[value]: value for value in range(256)}
    vocabulary[END_TOKEN] = END_TOKEN_ID
    # "a" then a UTF-8 continuation byte: never adjacent in valid UTF-8.
    first, second = character_of[ord("a")], character_of[0x80]
    vocabulary[first + second] = UNREACHABLE_TOKEN_ID
    return vocabulary, [f"{first} {second}"]


def char_tokenizer():
    """A `GPT2Tokenizer` with one token per byte (module docstring)."""
    vocabulary, merges = char_vocabulary_and_merges()
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)


def build_causal_lm(
    num_layers,
    num_heads,
    hidden_dim,
    intermediate_dim,
    max_sequence_length,
    seed=0,
):
    """A randomly initialised character `GPT2CausalLM` with its
    preprocessor (`sequence_length = max_sequence_length`), no dropout."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY_SIZE,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
        dropout=0.0,
        max_sequence_length=max_sequence_length,
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        char_tokenizer(), sequence_length=max_sequence_length
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)


@contextlib.contextmanager
def detached_preprocessor(task):
    """Runs with `task.preprocessor = None`: `fit`, `predict` and
    `generate` then take token ids, as the backbone does."""
    preprocessor = task.preprocessor
    task.preprocessor = None
    try:
        yield task
    finally:
        task.preprocessor = preprocessor


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Splits:
    """Encoded text of the three splits (module docstring), and file names."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    files: dict

    def describe(self):
        return {
            "source": str(stdlib_text.stdlib_directory()),
            **{f"{name}_files": len(names) for name, names in self.files},
            **{
                f"{name}_chars": int(getattr(self, name).size)
                for name in ("train", "validation", "test")
            },
        }


def load_splits(directory=None):
    """Reads the standard library sources and splits them by file."""
    texts = {"train": [], "validation": [], "test": []}
    held_out = 0
    for index, path in enumerate(stdlib_text.source_files(directory)):
        if index % stdlib_text.VALIDATION_EVERY:
            split = "train"
        else:
            split = ("validation", "test")[held_out % 2]
            held_out += 1
        texts[split].append(
            (path.name, path.read_text(encoding="utf-8", errors="replace"))
        )
    encoded = {
        split: stdlib_text.encode(
            stdlib_text.FILE_SEPARATOR.join(text for _, text in files)
        )
        for split, files in texts.items()
    }
    files = tuple(
        (split, tuple(name for name, _ in entries))
        for split, entries in texts.items()
    )
    return Splits(files=files, **encoded)


def windows_at(codes, starts, length):
    """Causal-LM batches of `length` characters at each start.

    Returns:
        `(inputs, targets)`: `inputs` a dict of `token_ids` (the end token,
        which GPT-2's preprocessor puts first, then the first `length - 1`
        characters) and `padding_mask` (all true); `targets` the `length`
        characters, each predicted from those before it.
    """
    starts = np.asarray(starts, np.int64)
    offsets = starts[:, None] + np.arange(length)[None, :]
    characters = codes[offsets].astype(np.int32)
    token_ids = np.concatenate(
        [np.full((len(starts), 1), END_TOKEN_ID, np.int32), characters[:, :-1]],
        axis=1,
    )
    inputs = {
        "token_ids": token_ids,
        "padding_mask": np.ones_like(token_ids, dtype=bool),
    }
    return inputs, characters


def random_windows(codes, length, count, seed):
    rng = np.random.default_rng(seed)
    return windows_at(
        codes, rng.integers(0, codes.size - length, count), length
    )


def evenly_spaced_windows(codes, length, count):
    starts = np.linspace(0, codes.size - length - 1, count).astype(np.int64)
    return windows_at(codes, starts, length)


def batches_of(inputs, batch_size):
    """`inputs` cut into a list of batches (the form `convert_model`'s
    `calibration_data` takes)."""
    count = len(next(iter(inputs.values())))
    return [
        {
            key: value[start : start + batch_size]
            for key, value in inputs.items()
        }
        for start in range(0, count, batch_size)
    ]


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _point(step, history, began):
    """A point of the loss curve: the mean training loss since the last
    one, and the validation loss."""
    point = {
        "step": step,
        "train_loss": float(history["loss"][-1]),
        "validation_loss": float(history["val_loss"][-1]),
        "seconds": round(time.perf_counter() - began, 1),
    }
    print(
        f"  step {step}: train {point['train_loss']:.4f}, validation "
        f"{point['validation_loss']:.4f} ({point['seconds']:.0f} s)",
        flush=True,
    )
    return point


def train(causal_lm, splits, config):
    """Trains `causal_lm` in place on random windows of the training split.

    Args:
        causal_lm: From `build_causal_lm`.
        splits: From `load_splits`.
        config: `steps`, `batch_size`, `sequence_length`, `eval_every`,
            `validation_windows`, `learning_rate`, `warmup_fraction`,
            `weight_decay`, `global_clipnorm`, `seed`.

    Returns:
        A dict: the loss curve (`points`: step, training loss, validation
        loss), the final validation loss and bits per character, and the
        wall time of `fit`.
    """
    steps, every = config["steps"], config["eval_every"]
    if steps % every:
        raise ValueError(f"steps={steps} is not a multiple of {every}.")
    optimizer = char_lm.warmup_cosine_adamw(
        steps,
        config["learning_rate"],
        config["warmup_fraction"],
        config["weight_decay"],
        config["global_clipnorm"],
    )
    rng = np.random.default_rng(config["seed"])
    validation = evenly_spaced_windows(
        splits.validation,
        config["sequence_length"],
        config["validation_windows"],
    )
    points = []
    with detached_preprocessor(causal_lm):
        causal_lm.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
        )
        began = time.perf_counter()
        # One `fit` per point of the curve; the optimizer's step count, and
        # so its schedule, carries over from one to the next.
        for chunk in range(steps // every):
            windows = windows_at(
                splits.train,
                rng.integers(
                    0,
                    splits.train.size - config["sequence_length"],
                    every * config["batch_size"],
                ),
                config["sequence_length"],
            )
            history = causal_lm.fit(
                *windows,
                batch_size=config["batch_size"],
                epochs=1,
                shuffle=False,
                validation_data=validation,
                verbose=0,
            )
            points.append(_point((chunk + 1) * every, history.history, began))
        fit_s = time.perf_counter() - began
    final = points[-1]["validation_loss"]
    return {
        "points": points,
        "validation_loss": final,
        "validation_bpc": final / math.log(2),
        "fit_s": round(fit_s, 1),
        "parameters": causal_lm.count_params(),
    }


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------


def make_preset(directory, model, training, splits=None, force=False):
    """Builds, trains and saves a character GPT-2 as a KerasHub preset.

    Args:
        directory: The preset folder (written atomically).
        model: `build_causal_lm`'s arguments (`max_sequence_length` is
            `training["sequence_length"]`).
        training: `train`'s configuration.
        splits: From `load_splits` (read when `None`).
        force: Whether to replace an existing preset.

    Returns:
        The training record, also written to `TRAINING_FILE` in the preset:
        the model and training configurations, the text splits, the loss
        curve and timings.
    """
    splits = splits or load_splits()
    causal_lm = build_causal_lm(
        max_sequence_length=training["sequence_length"], **model
    )
    result = train(causal_lm, splits, training)
    record = {
        "model": dict(model),
        "training": dict(training),
        "text": splits.describe(),
        **result,
    }
    with atomic_directory(directory, force=force) as staging:
        causal_lm.save_to_preset(staging)
        write_json(os.path.join(staging, TRAINING_FILE), record)
    record["preset_bytes"] = preset_bytes(directory)
    return record


def load_preset(directory):
    """`(causal_lm, training record)` of a preset from `make_preset`; the
    record is `{}` for a preset written otherwise."""
    causal_lm = keras_hub.models.CausalLM.from_preset(directory)
    path = os.path.join(directory, TRAINING_FILE)
    record = {}
    if os.path.isfile(path):
        with open(path) as file:
            record = json.load(file)
        record["preset_bytes"] = preset_bytes(directory)
    return causal_lm, record


def preset_bytes(directory):
    """Total size of the files of a preset folder."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(directory)
        for name in names
    )


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def logits_of(causal_lm, inputs, batch_size=32):
    """Next-token logits `(N, T, vocabulary)` as float32 NumPy."""
    with detached_preprocessor(causal_lm):
        logits = causal_lm.predict(inputs, batch_size=batch_size, verbose=0)
    return np.asarray(logits, np.float32)


def mean_negative_log_likelihood(logits, targets):
    """Mean over all positions of `-log p(target)`, in nats."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=-1))
    picked = np.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
    return float((log_norm - picked).mean())


def greedy_continuations(causal_lm, prompts, new_tokens):
    """Greedy continuations of `prompts` by `generate()`.

    Args:
        causal_lm: A `CausalLM` (a converted one decodes with its compact
            cache).
        prompts: `(N, P)` int array of character ids.
        new_tokens: How many tokens to generate after each prompt.

    Returns:
        `(N, new_tokens)` int array of the generated ids (the end token
        stops nothing: `stop_token_ids=None`).
    """
    count, prompt_length = prompts.shape
    length = 1 + prompt_length + new_tokens
    token_ids = np.zeros((count, length), np.int32)
    token_ids[:, 0] = END_TOKEN_ID
    token_ids[:, 1 : 1 + prompt_length] = prompts
    padding_mask = np.zeros((count, length), bool)
    padding_mask[:, : 1 + prompt_length] = True
    sampler = causal_lm.sampler
    causal_lm.compile(sampler="greedy")
    try:
        with detached_preprocessor(causal_lm):
            outputs = causal_lm.generate(
                {"token_ids": token_ids, "padding_mask": padding_mask},
                stop_token_ids=None,
            )
    finally:
        causal_lm.compile(sampler=sampler)
    return np.asarray(outputs["token_ids"])[:, 1 + prompt_length :]


def agreement(reference, candidate):
    """How far greedy continuations agree with the original's.

    Returns:
        A dict: `token_agreement`, the fraction of positions with the same
        token; `prefix_agreement`, the mean fraction of each continuation
        before the first difference; `identical`, the fraction of
        continuations identical throughout.
    """
    same = np.asarray(reference) == np.asarray(candidate)
    first_difference = np.where(
        same.all(axis=1), same.shape[1], np.argmin(same, axis=1)
    )
    return {
        "token_agreement": float(same.mean()),
        "prefix_agreement": float(first_difference.mean() / same.shape[1]),
        "identical": float(same.all(axis=1).mean()),
    }
