"""The full benchmark set: every CPU suite, one after the other.

`python -m benchmarks all [--quick] [--backend B | --backend-all]` runs
`layer_speed`, `training`, `conversion`, `fidelity` and `pruning` with their
default (or `--quick`) configurations, each in its own process, one at a time
so that no suite's timings share the cores with another. With `--backend`
each suite runs on that backend; with `--backend-all` each suite runs on all
three (three times as long). The `gpu` suite is not part of it: it is
`layer_speed` at the accelerator configuration.

Each suite writes its own results as usual. This suite adds
`all_<backend>.{json,md,png}`: every suite's command, exit status and wall
time, and the total against the time the set is meant to take (30 minutes
for the full set on 2 CPU cores, 3 minutes per suite for `--quick`).
"""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness.backends import BACKENDS
from benchmarks.harness.backends import child_environment
from benchmarks.harness.markdown import markdown_table
from benchmarks.harness.metadata import collect_metadata
from benchmarks.harness.metadata import describe_device
from benchmarks.harness.metadata import finish_metadata
from benchmarks.harness.plots import new_figure
from benchmarks.harness.plots import save_figure
from benchmarks.harness.result_files import result_path
from benchmarks.harness.result_files import write_json
from benchmarks.harness.result_files import write_text

SUITE = "all"
# `__main__` leaves `--backend-all` to this module: each suite handles it.
RUNS_ITS_OWN_BACKENDS = True

# The suites of the set, in the order they run: the timing suite first.
SUITES = ("layer_speed", "training", "conversion", "fidelity", "pruning")
# The budgets on a 2-core CPU machine, for one backend.
FULL_BUDGET_S = 30 * 60
QUICK_BUDGET_PER_SUITE_S = 3 * 60


def main(args):
    start = time.perf_counter()
    backend = _backend_label(args)
    metadata = collect_metadata(SUITE, args.quick, backend)
    document = {
        "suite": SUITE,
        "metadata": metadata,
        "config": {"suites": list(SUITES), "budget_s": _budget_s(args)},
        "rows": [],
        "errors": [],
    }
    for suite in SUITES:
        row = _run_suite(suite, args, backend)
        document["rows"].append(row)
        if row["exit_status"] != 0:
            document["errors"].append(
                {
                    "backend": backend,
                    "message": f"{suite} exited with status "
                    f"{row['exit_status']}",
                }
            )
        # Saved after every suite: an interrupted set keeps what ran.
        write_json(
            result_path(args.output_dir, SUITE, backend, ".json"),
            document,
        )
    finish_metadata(metadata, start)
    write_json(result_path(args.output_dir, SUITE, backend, ".json"), document)
    report(document, args.output_dir, f"{SUITE}_{backend}")
    print(f"all on {backend}: {metadata['wall_time_s']} s")
    return 1 if document["errors"] else 0


def _backend_label(args):
    if args.backend_all:
        return "all"
    # Keras' default when KERAS_BACKEND is unset.
    return args.backend or os.environ.get("KERAS_BACKEND") or "tensorflow"


def _budget_s(args):
    if args.quick:
        return QUICK_BUDGET_PER_SUITE_S * len(SUITES)
    return FULL_BUDGET_S * (len(BACKENDS) if args.backend_all else 1)


def suite_command(suite, args, backend):
    """The command line that runs `suite` as part of the set."""
    command = [sys.executable, "-m", "benchmarks", suite]
    command += ["--backend-all"] if backend == "all" else ["--backend", backend]
    command += ["--output-dir", str(args.output_dir)]
    return command + (["--quick"] if args.quick else [])


def _run_suite(suite, args, backend):
    command = suite_command(suite, args, backend)
    print(f"=== all: {shlex.join(command)}", flush=True)
    environment = child_environment(
        os.environ.get("KERAS_BACKEND", "tensorflow")
        if backend == "all"
        else backend
    )
    began = time.perf_counter()
    completed = subprocess.run(command, env=environment, check=False)
    wall_time_s = round(time.perf_counter() - began, 1)
    print(
        f"=== all: {suite} took {wall_time_s} s, exit status "
        f"{completed.returncode}",
        flush=True,
    )
    return {
        "suite": suite,
        "command": shlex.join(["python", *command[1:]]),
        "exit_status": completed.returncode,
        "wall_time_s": wall_time_s,
        "results": str(result_path(args.output_dir, suite, backend, ".*")),
    }


def report(document, output_dir, stem):
    """Writes the Markdown summary and the bar chart of the suites' times."""
    metadata = document["metadata"]
    budget_s = document["config"]["budget_s"]
    total_s = sum(row["wall_time_s"] for row in document["rows"])
    quick = " (--quick)" if metadata["quick"] else ""
    within = "within" if total_s <= budget_s else "OVER"
    rows = [
        [
            row["suite"],
            f"{row['wall_time_s'] / 60:.1f}",
            _status(row["exit_status"]),
            f"`{_relative_to_working_directory(row['results'])}`",
        ]
        for row in document["rows"]
    ]
    lines = [
        f"# The full benchmark set{quick}",
        "",
        f"- {describe_device(metadata)}; backend "
        f"{metadata['backend']}; {metadata['date']}; "
        f"`{metadata['command']}`; load average "
        f"{metadata['load_average_at_start'][0]:.2f} at start",
        "",
        markdown_table(["suite", "minutes", "status", "results"], rows),
        "",
        f"Total: {total_s / 60:.1f} min, {within} the budget of "
        f"{budget_s / 60:.0f} min.",
        "",
    ]
    write_text(Path(output_dir) / f"{stem}.md", "\n".join(lines))
    _plot(document, output_dir, stem, budget_s)


def _status(exit_status):
    return "ok" if exit_status == 0 else f"FAILED ({exit_status})"


def _relative_to_working_directory(path):
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _plot(document, output_dir, stem, budget_s):
    figure, axes = new_figure(1, 1, panel_size=(6.0, 2.8))
    ax = axes[0][0]
    names = [row["suite"] for row in document["rows"]]
    minutes = [row["wall_time_s"] / 60 for row in document["rows"]]
    starts = [sum(minutes[:index]) for index in range(len(minutes))]
    ax.barh(names, minutes, left=starts)
    ax.axvline(budget_s / 60, color="red", linestyle="--", label="budget")
    ax.invert_yaxis()
    ax.set_xlabel("minutes since the start of the set")
    ax.set_title(f"{stem}: wall time per suite")
    ax.legend(loc="lower right")
    save_figure(figure, Path(output_dir) / f"{stem}.png")
