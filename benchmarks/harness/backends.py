"""One subprocess per backend, and the merge of their results.

Keras reads `KERAS_BACKEND` once, when it is imported, so each backend a
suite runs on needs its own process.
"""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness.documents import merge_documents
from benchmarks.harness.metadata import collect_metadata
from benchmarks.harness.metadata import finish_metadata
from benchmarks.harness.result_files import read_json
from benchmarks.harness.result_files import result_path
from benchmarks.harness.result_files import write_json

BACKENDS = ("tensorflow", "jax", "torch")


def run_backend_subprocesses(
    suite, suite_arguments, backends, output_dir, quick
):
    """Runs `python -m benchmarks <suite>` once per backend, one at a time.

    Keras reads `KERAS_BACKEND` once, when it is imported, so each backend
    needs its own process. They run one after the other so that they do not
    compete for the cores or the accelerator they measure.

    Args:
        suite: Name of the suite to run.
        suite_arguments: The suite's own command-line arguments, passed on.
        backends: Backends to run.
        output_dir: Where the children write their results.
        quick: Whether to pass `--quick`.

    Returns:
        A `(documents, failures)` pair: the result document of each child that
        succeeded, and an error dict for each one that did not.
    """
    documents, failures = [], []
    for backend in backends:
        document, failure = _run_backend(
            suite, suite_arguments, backend, output_dir, quick
        )
        if failure is None:
            documents.append(document)
        else:
            failures.append(failure)
    return documents, failures


def _backend_command(suite, suite_arguments, backend, output_dir, quick):
    return [
        sys.executable,
        "-m",
        "benchmarks",
        suite,
        "--backend",
        backend,
        "--output-dir",
        str(output_dir),
        *(["--quick"] if quick else []),
        *suite_arguments,
    ]


def _run_backend(suite, suite_arguments, backend, output_dir, quick):
    """Runs one child; returns `(its document, None)` or `(None, error)`."""
    command = _backend_command(
        suite, suite_arguments, backend, output_dir, quick
    )
    print(f"=== {suite} on {backend}: {shlex.join(command)}", flush=True)
    started = time.time()
    completed = subprocess.run(
        command, env=child_environment(backend), check=False
    )
    path = result_path(output_dir, suite, backend, ".json")
    # A result older than the child is left over from an earlier run.
    fresh = path.exists() and path.stat().st_mtime >= started
    print(
        f"=== {suite} on {backend}: {time.time() - started:.0f} s, "
        f"exit status {completed.returncode}",
        flush=True,
    )
    if completed.returncode == 0 and fresh:
        return read_json(path), None
    message = f"subprocess exited with status {completed.returncode}" + (
        "" if fresh else " and wrote no result"
    )
    return None, {"backend": backend, "message": message}


def child_environment(backend, **variables):
    """Environment of a child process that runs `backend`.

    The repository root goes on `PYTHONPATH`, so that `python -m benchmarks`
    works in the child from any working directory.

    Args:
        backend: The child's `KERAS_BACKEND`.
        **variables: More environment variables to set.
    """
    environment = dict(os.environ, KERAS_BACKEND=backend, **variables)
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    repository_root = str(Path(__file__).resolve().parents[2])
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [repository_root, environment.get("PYTHONPATH")])
    )
    return environment


def run_on_backends(
    suite, suite_arguments, output_dir, quick, report=None, backends=BACKENDS
):
    """Runs a suite once per backend, then merges and reports the results.

    Returns:
        The merged document (see `save_merged`).
    """
    start = time.perf_counter()
    metadata = collect_metadata(suite, quick)
    documents, failures = run_backend_subprocesses(
        suite, suite_arguments, backends, output_dir, quick
    )
    return save_merged(documents, failures, output_dir, metadata, report, start)


def save_merged(documents, failures, output_dir, metadata, report, start_time):
    """Merges per-backend documents and writes `<suite>_all.*`.

    Args:
        documents: Result documents of the backends that succeeded.
        failures: Error dicts of the backends that failed.
        output_dir: Where to write.
        metadata: `collect_metadata(suite, quick)` of the parent process,
            collected when the run started.
        report: `report(document, output_dir, stem)` writing the table and
            plot, or `None` for the JSON only.
        start_time: `time.perf_counter()` when the run started.

    Returns:
        The merged document; `failed_backends` lists the backends whose
        process failed.
    """
    suite = metadata["suite"]
    merged = merge_documents(documents, failures, metadata)
    finish_metadata(merged["metadata"], start_time)
    write_json(result_path(output_dir, suite, "all", ".json"), merged)
    if report is not None:
        report(merged, output_dir, f"{suite}_all")
    print(f"Merged results: {result_path(output_dir, suite, 'all', '.*')}")
    return merged
