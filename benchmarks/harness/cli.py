"""The command line of `python -m benchmarks`: the options every suite
takes, and the parsers that find the suite and read its own options."""

import argparse

from benchmarks.harness.backends import BACKENDS


def add_common_arguments(parser):
    """Adds `--quick`, `--backend`/`--backend-all` and `--output-dir`."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Reduced configuration, to check that the suite runs.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--backend",
        choices=BACKENDS,
        help="Keras backend (default: $KERAS_BACKEND, else Keras' default).",
    )
    which.add_argument(
        "--backend-all",
        action="store_true",
        help="Run on every backend, one subprocess each, and merge results.",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="Where results go (default: benchmarks/results, or "
        "benchmarks/results/quick with --quick).",
    )


def suite_name_parser(suites):
    """Parser that only finds the suite and the options common to all."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("suite", choices=sorted(suites))
    add_common_arguments(parser)
    return parser


def full_parser(suite, module, suites):
    """Parser of the common options and those of the suite's `module`."""
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks {suite}",
        description=(module.__doc__ or "").strip().split("\n")[0],
    )
    parser.add_argument("suite", choices=sorted(suites))
    add_common_arguments(parser)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    return parser
