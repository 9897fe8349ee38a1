"""Train a small character-level GPT-2, convert it, and generate with the
converted model's compact cache.

    KERAS_BACKEND=jax python examples/generate_with_converted_gpt2.py
    KERAS_BACKEND=torch python examples/generate_with_converted_gpt2.py
    python examples/generate_with_converted_gpt2.py --quick   # smaller run

No pretrained GPT-2 can be downloaded offline, so the example trains one:
KerasHub's own `GPT2Backbone` and `GPT2CausalLM`, with a real
`GPT2Tokenizer` whose vocabulary is GPT-2's 256 byte-level characters (one
token per character), for a few epochs on sentences of the built-in corpus
(docstrings of Python's standard library). It then

1. converts every attention layer, activation-aware, on other sentences of
   the corpus;
2. compares the held-out loss of the original and the converted model;
3. generates greedily from the same prompts with both: the converted
   `CollaborativeGPT2CausalLM` decodes with the compact collaborative cache,
   one `(batch, 1, max_length, D̃ + H + H·d_v)` tensor per layer
   (`D̃ + H + D̃_v` with `--shared-value-dim`), where KerasHub's GPT-2
   caches keys and values, `2·H·d` numbers per layer and token;
4. prints the cache numbers per token of both, measured on the caches that
   `generate()` builds.
"""

import argparse

import keras
import keras_hub
import numpy as np
from keras import ops

import keras_collab
from keras_collab.conversion.attention import parse_dim
from keras_collab.hub import text

END_TOKEN = "<|endoftext|>"
PROMPTS = ("The ", "Return the ", "If the ")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shared-key-dim",
        default="0.5",
        help="D̃: an integer, or a fraction of num_heads*key_dim (default 0.5)",
    )
    parser.add_argument(
        "--shared-value-dim",
        help="D̃_v of shared values, as --shared-key-dim (default: values "
        "per head, copied exactly)",
    )
    parser.add_argument("--train", type=int, default=1536)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="64 training sentences, one epoch, shorter sequences",
    )
    # --quick changes the defaults; flags given with it still apply.
    if parser.parse_args(argv).quick:
        parser.set_defaults(
            train=64,
            epochs=1,
            samples=16,
            held_out=16,
            sequence_length=64,
            max_length=24,
            max_iter=30,
        )
    args = parser.parse_args(argv)
    args.shared_key_dim = parse_dim(args.shared_key_dim)
    args.shared_value_dim = parse_dim(args.shared_value_dim, "shared_value_dim")
    return args


def byte_characters():
    """GPT-2's byte-level alphabet: `{byte value: character}` (printable
    bytes stand for themselves, the others for characters from U+0100)."""
    kept = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    characters = {value: chr(value) for value in kept}
    others = [value for value in range(256) if value not in characters]
    for offset, value in enumerate(others):
        characters[value] = chr(256 + offset)
    return characters


def char_tokenizer():
    """A `GPT2Tokenizer` with one token per byte: token id = byte value,
    then the end token (256).

    KerasHub builds no byte-pair tokenizer without merges, so there is one
    merge that never applies: "a" then a UTF-8 continuation byte, never
    adjacent in UTF-8 text (its result, 257, is never produced).
    """
    characters = byte_characters()
    vocabulary = {characters[value]: value for value in range(256)}
    vocabulary[END_TOKEN] = 256
    first, second = characters[ord("a")], characters[0x80]
    vocabulary[first + second] = 257
    return keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=[f"{first} {second}"]
    )


def build_causal_lm(args):
    keras.utils.set_random_seed(args.seed)
    tokenizer = char_tokenizer()
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        intermediate_dim=256,
        dropout=0.0,
        max_sequence_length=max(args.sequence_length, args.max_length),
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=args.sequence_length
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)


def compile_for(task, learning_rate=3e-3):
    task.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        sampler="greedy",
    )


def held_out_loss(task, batches):
    """Mean cross-entropy (nats) of each next character over real tokens,
    from the logits of `task` on `batches` of token ids and masks."""
    total = count = 0.0
    for batch in batches:
        logits = ops.convert_to_numpy(task(batch))[:, :-1].astype("float64")
        targets = batch["token_ids"][:, 1:]
        weights = batch["padding_mask"][:, 1:].astype("float64")
        shift = logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits - shift).sum(axis=-1)) + shift[..., 0]
        chosen = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        total += ((log_norm - chosen) * weights).sum()
        count += weights.sum()
    return float(total / count)


def cache_numbers(task, max_length):
    """Numbers and bytes per token of the cache `generate()` builds for one
    sequence of `max_length` tokens (`_build_cache`, as `generate` calls
    it)."""
    _, cache = task._build_cache(ops.zeros((1, max_length), "int32"))
    numbers = bytes_ = 0
    for tensor in keras.tree.flatten(cache):
        size = int(np.prod(ops.shape(tensor)))
        numbers += size
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        bytes_ += size * np.dtype(dtype).itemsize
    return numbers // max_length, bytes_ // max_length


def main(argv=None):
    args = parse_args(argv)
    print(f"Keras backend: {keras.backend.backend()}")
    corpus = text.builtin_corpus()
    train_texts = corpus[: args.train]
    calibration_texts = corpus[args.train : args.train + args.samples]
    start = args.train + args.samples
    held_out_texts = corpus[start : start + args.held_out]

    original = build_causal_lm(args)
    compile_for(original)
    print(
        f"Training a character GPT-2 ({original.count_params():,} "
        f"parameters) on {len(train_texts)} sentences, epochs: {args.epochs}"
    )
    # The corpus comes shuffled; KerasHub feeds text through `tf.data`,
    # where `fit` cannot shuffle it.
    original.fit(
        train_texts,
        batch_size=32,
        epochs=args.epochs,
        shuffle=False,
        verbose=2,
    )

    calibration = text.encode(original.preprocessor, calibration_texts)
    result = keras_collab.convert_model(
        original,
        args.shared_key_dim,
        shared_value_dim=args.shared_value_dim,
        calibration_data=calibration,
        max_iter=args.max_iter,
    )
    converted = result.model
    compile_for(converted)
    print(
        f"Converted {len(result.layers)} attention layers to "
        f"{type(converted).__name__}: query/key parameters "
        f"{result.qk_params_before:,} -> {result.qk_params_after:,}"
    )

    held_out = text.encode(original.preprocessor, held_out_texts)
    losses = {
        name: held_out_loss(task, held_out)
        for name, task in (("original", original), ("converted", converted))
    }
    print(
        f"Held-out loss per character ({len(held_out_texts)} sentences): "
        f"original {losses['original']:.4f}, converted "
        f"{losses['converted']:.4f}"
    )

    generated = {}
    for name, task in (("original", original), ("converted", converted)):
        generated[name] = task.generate(
            list(PROMPTS), max_length=args.max_length
        )
    for prompt, a, b in zip(
        PROMPTS, generated["original"], generated["converted"]
    ):
        print(f"prompt {prompt!r}\n  original:  {a!r}\n  converted: {b!r}")

    cache = {
        name: cache_numbers(task, args.max_length)
        for name, task in (("original", original), ("converted", converted))
    }
    (numbers, bytes_), (new_numbers, new_bytes) = (
        cache["original"],
        cache["converted"],
    )
    print(
        f"Cache per token (all {original.backbone.num_layers} layers): "
        f"original {numbers} numbers ({bytes_} bytes), converted "
        f"{new_numbers} numbers ({new_bytes} bytes): "
        f"{new_numbers / numbers:.2f}x"
    )
    return {
        "backend": keras.backend.backend(),
        "qk_params_before": result.qk_params_before,
        "qk_params_after": result.qk_params_after,
        "held_out_loss": losses,
        "generated": generated,
        "cache_numbers_per_token": {k: v[0] for k, v in cache.items()},
        "cache_bytes_per_token": {k: v[1] for k, v in cache.items()},
        "converted_class": type(converted).__name__,
    }


if __name__ == "__main__":
    main()
