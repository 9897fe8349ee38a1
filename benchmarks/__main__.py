"""Command line of the benchmarks: `python -m benchmarks <suite> [options]`.

A suite is a module of this package with a `main(args)` function that
measures on the current Keras backend and writes its results. Adding one is a
single line in `SUITES`. A suite module may also define:

- `add_arguments(parser)`: adds its own command-line options;
- `report(document, output_dir, stem)`: writes the Markdown table and plot of
  a result document, used for the merge of a `--backend-all` run;
- `RUNS_ITS_OWN_BACKENDS = True`: `main` spawns the backends itself (the `gpu`
  and `all` pseudo-suites), so `--backend-all` is not handled here.

Suite modules must not import Keras at module level: this process imports
them to read their options, and with `--backend-all` it only spawns one child
per backend, each with its own `KERAS_BACKEND`.
"""

import argparse
import importlib
import os
import sys

from benchmarks import common

# Suite name -> module. Register a new suite here.
SUITES = {
    "layer_speed": "benchmarks.layer_speed",
    "training": "benchmarks.training",
    "gpu": "benchmarks.gpu",
    "conversion": "benchmarks.conversion",
    "fidelity": "benchmarks.fidelity",
    "pruning": "benchmarks.pruning",
    "all": "benchmarks.full_set",
}


def _add_common_arguments(parser):
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Reduced configuration, to check that the suite runs.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--backend",
        choices=common.BACKENDS,
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


def _suite_name_parser():
    """Parser that only finds the suite and the options common to all."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("suite", choices=sorted(SUITES))
    _add_common_arguments(parser)
    return parser


def _full_parser(suite, module):
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks {suite}",
        description=(module.__doc__ or "").strip().split("\n")[0],
    )
    parser.add_argument("suite", choices=sorted(SUITES))
    _add_common_arguments(parser)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Suites:", ", ".join(sorted(SUITES)))
        return 0 if argv else 2
    known, suite_arguments = _suite_name_parser().parse_known_args(argv)
    module = importlib.import_module(SUITES[known.suite])
    args = _full_parser(known.suite, module).parse_args(argv)
    if args.output_dir is None:
        args.output_dir = str(common.default_output_dir(args.quick))
    # Suite options are passed on to the children of a --backend-all run.
    suite_arguments = [a for a in suite_arguments if a not in ("-h", "--help")]

    if args.backend_all and not getattr(module, "RUNS_ITS_OWN_BACKENDS", False):
        merged = common.run_on_backends(
            args.suite,
            suite_arguments,
            args.output_dir,
            args.quick,
            report=getattr(module, "report", None),
        )
        return 1 if merged["failed_backends"] else 0
    if args.backend:
        # Must happen before the suite imports Keras.
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return module.main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
