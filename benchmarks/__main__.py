"""Command line of the benchmarks: `python -m benchmarks <suite> [options]`.

A suite is a module of `benchmarks.suites` with a `main(args)` function that
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

import importlib
import os
import sys

from benchmarks.harness.backends import run_on_backends
from benchmarks.harness.cli import full_parser
from benchmarks.harness.cli import suite_name_parser
from benchmarks.harness.result_files import default_output_dir

# Suite name -> module. Register a new suite here.
SUITES = {
    "layer_speed": "benchmarks.suites.layer_speed",
    "training": "benchmarks.suites.training",
    "gpu": "benchmarks.suites.gpu",
    "conversion": "benchmarks.suites.conversion",
    "fidelity": "benchmarks.suites.fidelity",
    "pruning": "benchmarks.suites.pruning",
    "decode": "benchmarks.suites.decode",
    "decoder_quality": "benchmarks.suites.decoder_quality",
    "inference": "benchmarks.suites.inference",
    "all": "benchmarks.suites.full_set",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Suites:", ", ".join(sorted(SUITES)))
        return 0 if argv else 2
    known, suite_arguments = suite_name_parser(SUITES).parse_known_args(argv)
    module = importlib.import_module(SUITES[known.suite])
    args = full_parser(known.suite, module, SUITES).parse_args(argv)
    if args.output_dir is None:
        args.output_dir = str(default_output_dir(args.quick))
    # Suite options are passed on to the children of a --backend-all run.
    suite_arguments = [a for a in suite_arguments if a not in ("-h", "--help")]

    if args.backend_all and not getattr(module, "RUNS_ITS_OWN_BACKENDS", False):
        merged = run_on_backends(
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
