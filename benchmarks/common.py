"""Helpers shared by the benchmark suites.

Nothing here imports Keras or a backend at module level: the parent process of
a `--backend-all` run only spawns one child per backend and merges their
results, and `KERAS_BACKEND` must be set before Keras is first imported. The
few helpers that need a backend library import it when called.

Every suite writes one JSON document per run:

```
{
    "suite": "layer_speed",
    "metadata": {...},          # the process that wrote the document
    "backends": {"jax": {...}}, # metadata of each process that measured
    "config": {"jax": {...}},   # what each backend was asked to measure
    "rows": [{"backend": "jax", ...}, ...],
    "errors": [{"backend": "jax", "message": "..."}, ...],
}
```

so that documents from several backends merge by concatenating their rows.
"""

import dataclasses
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BACKENDS = ("tensorflow", "jax", "torch")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Quick runs land apart so that they never overwrite full results.
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"
MIB = 2**20

# Environment variables that change how fast or where backends compute.
_RECORDED_ENVIRONMENT = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "XLA_FLAGS",
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "TF_FORCE_GPU_ALLOW_GROWTH",
    "CUDA_VISIBLE_DEVICES",
)

# Distributions whose versions go into the metadata. TensorFlow ships under
# several names; the first one installed is reported.
_VERSIONED_DISTRIBUTIONS = {
    "python": None,
    "numpy": ("numpy",),
    "keras": ("keras",),
    "keras_collab": ("keras-collab",),
    "keras_hub": ("keras-hub",),
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
    "torch": ("torch",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly"),
}


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------


def cpu_model():
    """The CPU model name from `/proc/cpuinfo`, or `platform`'s guess."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions():
    """Versions of Python and of the packages a result depends on.

    Read from the installed distributions, so that reporting the TensorFlow
    version does not import TensorFlow into a JAX process.
    """
    versions = {"python": platform.python_version()}
    for name, distributions in _VERSIONED_DISTRIBUTIONS.items():
        if distributions is None:
            continue
        versions[name] = None
        for distribution in distributions:
            try:
                versions[name] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def detect_accelerator(backend):
    """Describes the device the given backend computes on.

    Imports the backend library, so call it only in a process running that
    backend.

    Returns:
        A dict with `kind` (`"gpu"`, `"tpu"` or `"cpu"`), `name` (the device
        model) and `count` (the number of such devices).
    """
    if backend == "jax":
        import jax

        devices = jax.devices()
        kind = devices[0].platform
        if kind in ("gpu", "tpu"):
            return {
                "kind": kind,
                "name": devices[0].device_kind,
                "count": len(devices),
            }
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            return {
                "kind": "gpu",
                "name": torch.cuda.get_device_name(0),
                "count": torch.cuda.device_count(),
            }
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return {
                "kind": "gpu",
                "name": details.get("device_name", gpus[0].name),
                "count": len(gpus),
            }
    return {"kind": "cpu", "name": cpu_model(), "count": 1}


def command_line():
    """The command that started this process, as a user would type it."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "__main__.py" and argv0.parent.name == "benchmarks":
        return shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )


def collect_metadata(suite, quick, backend=None, accelerator=None):
    """Metadata describing where, when and how a result was measured.

    Args:
        suite: Name of the suite.
        quick: Whether the suite ran its reduced `--quick` configuration.
        backend: The Keras backend measured, `None` in a parent process that
            only merges results.
        accelerator: The output of `detect_accelerator`, if known.

    Returns:
        A JSON-serialisable dict. The load average is recorded because the
        timings are only comparable on an otherwise idle machine.
    """
    return {
        "suite": suite,
        "backend": backend,
        "quick": bool(quick),
        "date": utc_now(),
        "command": command_line(),
        "device": accelerator,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "environment": {
            name: os.environ[name]
            for name in _RECORDED_ENVIRONMENT
            if name in os.environ
        },
        "versions": package_versions(),
    }


def finish_metadata(metadata, start_time):
    """Adds the wall time and the final load average to `metadata`."""
    metadata["wall_time_s"] = round(time.perf_counter() - start_time, 1)
    metadata["load_average_at_end"] = list(os.getloadavg())
    return metadata


def new_document(suite, metadata, config):
    """An empty result document for one backend (see the module docstring)."""
    backend = metadata["backend"]
    return {
        "suite": suite,
        "metadata": metadata,
        "backends": {backend: metadata},
        "config": {backend: config},
        "rows": [],
        "errors": [],
    }


def describe_device(metadata):
    """One-line description of the device in `metadata`, e.g. for a title."""
    device = metadata.get("device") or {}
    if device.get("kind", "cpu") == "cpu":
        return f"CPU {metadata['cpu_model']} ({metadata['cpus_usable']} cores)"
    count = device.get("count", 1)
    suffix = f" x{count}" if count > 1 else ""
    return f"{device['kind'].upper()} {device['name']}{suffix}"


def limit_cpu_threads(threads):
    """Limits the BLAS and OpenMP thread pools of this process to `threads`.

    NumPy's OpenBLAS reads `OPENBLAS_NUM_THREADS` only when it is loaded,
    which happens before any suite runs, so the pools are resized at run time
    with `threadpoolctl` when it is installed. On a machine shared with other
    jobs, BLAS threads that wait for busy cores spin, and two OpenBLAS threads
    on two shared cores ran a TensorLy PARAFAC sweep 20 times slower than one.

    Args:
        threads: Threads per pool, or `None` to leave the pools alone.

    Returns:
        A JSON-serialisable description: the limit asked for, whether it was
        applied, and the pools (library, API, threads) after the change.
    """
    description = {"requested": threads, "applied": False, "pools": []}
    try:
        import threadpoolctl
    except ImportError:
        description["note"] = (
            "threadpoolctl is not installed: pools left as loaded; set "
            "OPENBLAS_NUM_THREADS/OMP_NUM_THREADS before starting instead"
        )
        return description
    if threads is not None:
        # Kept alive for the whole process: the limit lasts as long as it.
        global _THREAD_LIMITER
        _THREAD_LIMITER = threadpoolctl.threadpool_limits(limits=int(threads))
        description["applied"] = True
    description["pools"] = [
        {
            "library": pool.get("internal_api"),
            "api": pool.get("user_api"),
            "threads": pool.get("num_threads"),
        }
        for pool in threadpoolctl.threadpool_info()
    ]
    return description


_THREAD_LIMITER = None


# ---------------------------------------------------------------------------
# Result files
# ---------------------------------------------------------------------------


def default_output_dir(quick):
    return QUICK_RESULTS_DIR if quick else RESULTS_DIR


def result_path(output_dir, suite, backend, suffix):
    """Path of a result file: `<output_dir>/<suite>_<backend><suffix>`.

    `backend` is `"all"` for the merge of a `--backend-all` run.
    """
    return Path(output_dir) / f"{suite}_{backend}{suffix}"


def _write_atomically(path, write):
    """Calls `write(file_object)` on a temporary file, then renames it.

    Readers never see a half-written result, and an interrupted run leaves the
    previous result in place. The temporary file lives in the destination
    directory because a rename is only atomic within one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
        # mkstemp makes the file private; results are for everyone to read.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def _current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_json(path, data):
    """Writes `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, default=_json_default) + "\n"
    return _write_atomically(path, lambda file: file.write(text.encode()))


def write_text(path, text):
    """Writes a text file atomically."""
    return _write_atomically(path, lambda file: file.write(text.encode()))


def save_figure(figure, path):
    """Saves a matplotlib figure as PNG, atomically, and closes it."""
    import matplotlib.pyplot as plt

    try:
        return _write_atomically(
            path,
            lambda file: figure.savefig(
                file, format="png", dpi=120, bbox_inches="tight"
            ),
        )
    finally:
        plt.close(figure)


def new_figure(num_rows, num_columns, panel_size=(4.5, 3.5)):
    """A figure of `num_rows x num_columns` panels, on the Agg backend."""
    import matplotlib

    # Headless machines have no display: render to files only.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        num_rows,
        num_columns,
        figsize=(panel_size[0] * num_columns, panel_size[1] * num_rows),
        squeeze=False,
        constrained_layout=True,
    )
    return figure, axes


def label_dimensions(ax, dims):
    """Ticks the x axis of `ax` at the measured sizes `dims` only.

    On a log-2 axis matplotlib labels the powers of two, as powers; the sizes
    measured (D̃, total key size) read better as the plain numbers they are.
    Call it after `set_xscale`, which resets the ticks.
    """
    import matplotlib.ticker

    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(dims))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def read_json(path):
    with open(path) as file:
        return json.load(file)


def _json_default(value):
    """Converts numpy scalars and arrays, which `json` does not know."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Cannot serialise {type(value).__name__} to JSON")


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def format_value(value, digits=3):
    """Formats a table cell: floats to `digits` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if not np.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(headers, rows, digits=3):
    """A GitHub-flavoured Markdown table.

    Args:
        headers: Column titles. A title ending in `:` is right-aligned (the
            colon is not shown), for numbers.
        rows: Sequences of cell values, formatted with `format_value`.
        digits: Significant digits of float cells.

    Returns:
        The table, one line per row, ending with a newline.
    """
    titles = [header.rstrip(":") for header in headers]
    rules = ["---:" if header.endswith(":") else "---" for header in headers]
    lines = [
        "| " + " | ".join(titles) + " |",
        "| " + " | ".join(rules) + " |",
    ]
    for row in rows:
        cells = [
            format_value(value, digits).replace("|", "\\|") for value in row
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def environment_markdown(document):
    """Markdown lines describing the machine and software of each backend."""
    lines = []
    for backend, metadata in document["backends"].items():
        versions = metadata["versions"]
        lines.append(
            f"- **{backend}**: {describe_device(metadata)}; "
            f"keras {versions['keras']}, {backend} {versions.get(backend)}; "
            f"{metadata['date']}; {metadata.get('wall_time_s', '?')} s; "
            f"load average {metadata['load_average_at_start'][0]:.2f} at "
            f"start; `{metadata['command']}`"
        )
    return "\n".join(lines) + "\n"


def errors_markdown(document):
    """A Markdown list of the errors recorded in `document`, or ``""``."""
    if not document["errors"]:
        return ""
    lines = ["", "## Errors", ""]
    for error in document["errors"]:
        where = ", ".join(
            f"{key}={value}"
            for key, value in error.items()
            if key != "message" and value is not None
        )
        message = " ".join(str(error["message"]).split())[:300]
        lines.append(f"- {where}: {message}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# A suite's options, and its run on the backend of this process
# ---------------------------------------------------------------------------


def integers(text):
    """Parses an option of comma-separated integers, e.g. `96,192`.

    `""` gives `[]`, so that a list option can be emptied on the command line.
    """
    return [int(item) for item in text.split(",") if item.strip()]


def add_threads_argument(parser):
    """Adds `--threads`, the size of the BLAS/OpenMP pools to run with.

    The suites that take it hand it to `limit_cpu_threads`, after turning
    its 0 into `None`.
    """
    parser.add_argument(
        "--threads",
        type=int,
        help="BLAS/OpenMP threads (default 1; 0: leave as loaded).",
    )


def config_with_options(args, full, quick, options):
    """A suite's configuration: its `--quick` or full one, then its options.

    Args:
        args: The parsed command line; `args.quick` chooses the base.
        full: The suite's full configuration.
        quick: Its `--quick` configuration.
        options: The attributes of `args` that override the configuration
            key of the same name, or a mapping from such an attribute to the
            key it overrides. An option that was not given (`None`) keeps
            the base value.

    Returns:
        A new dict: `full` and `quick` stay as they are for the next run.
    """
    config = dict(quick if args.quick else full)
    if not isinstance(options, dict):
        options = {option: option for option in options}
    for option, key in options.items():
        value = getattr(args, option, None)
        if value is not None:
            config[key] = value
    return config


@dataclasses.dataclass
class SuiteRun:
    """A suite measuring on the backend of this process, from `start_run`.

    Attributes:
        suite: Name of the suite.
        output_dir: Where its results go.
        start_time: `time.perf_counter()` when the suite's `main` started.
        metadata: `collect_metadata` of this process, completed by `finish`.
        document: The result document (`new_document`) the suite fills.
    """

    suite: str
    output_dir: str
    start_time: float
    metadata: dict
    document: dict

    @property
    def backend(self):
        return self.metadata["backend"]

    def save(self):
        """Writes the document as it stands to `<suite>_<backend>.json`.

        Long suites call it as they go, so that an interrupted run keeps what
        it measured.
        """
        return write_json(
            result_path(self.output_dir, self.suite, self.backend, ".json"),
            self.document,
        )

    def finish(self, report):
        """Completes the metadata, then writes the document and its report.

        Args:
            report: The suite's `report(document, output_dir, stem)`.

        Returns:
            0, the exit status of a suite's `main` that got this far.
        """
        finish_metadata(self.metadata, self.start_time)
        self.save()
        report(self.document, self.output_dir, f"{self.suite}_{self.backend}")
        print(
            f"{self.suite} on {self.backend}: {self.metadata['wall_time_s']} s"
        )
        return 0


def start_run(suite, args, config, start_time, accelerator=None):
    """Starts a suite's run on the backend of this process.

    Imports Keras: call it from the suite's `main`, once `KERAS_BACKEND` is
    set.

    Args:
        suite: Name of the suite.
        args: The parsed command line (`quick`, `output_dir`).
        config: What the suite measures; it stays the document's, so that
            what the suite adds to it later is saved too.
        start_time: `time.perf_counter()` when the suite's `main` started,
            so that the wall time includes importing the backend.
        accelerator: The output of `detect_accelerator`, where the suite
            already has it.

    Returns:
        A `SuiteRun` with an empty document.
    """
    import keras

    backend = keras.backend.backend()
    if accelerator is None:
        accelerator = detect_accelerator(backend)
    metadata = collect_metadata(suite, args.quick, backend, accelerator)
    return SuiteRun(
        suite=suite,
        output_dir=args.output_dir,
        start_time=start_time,
        metadata=metadata,
        document=new_document(suite, metadata, config),
    )


# ---------------------------------------------------------------------------
# One subprocess per backend
# ---------------------------------------------------------------------------


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
        command = [
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
        print(f"=== {suite} on {backend}: {shlex.join(command)}", flush=True)
        started = time.time()
        completed = subprocess.run(
            command, env=child_environment(backend), check=False
        )
        path = result_path(output_dir, suite, backend, ".json")
        # A result older than the child is left over from an earlier run.
        fresh = path.exists() and path.stat().st_mtime >= started
        if completed.returncode == 0 and fresh:
            documents.append(read_json(path))
        else:
            failures.append(
                {
                    "backend": backend,
                    "message": (
                        f"subprocess exited with status {completed.returncode}"
                        + ("" if fresh else " and wrote no result")
                    ),
                }
            )
        print(
            f"=== {suite} on {backend}: {time.time() - started:.0f} s, "
            f"exit status {completed.returncode}",
            flush=True,
        )
    return documents, failures


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
    repository_root = str(Path(__file__).resolve().parent.parent)
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


def merge_documents(documents, failures, metadata):
    """Merges per-backend result documents into one (module docstring).

    Args:
        documents: Result documents of the backends that succeeded.
        failures: Error dicts of the backends that failed.
        metadata: Metadata of the process that merges.
    """
    merged = {
        "suite": metadata["suite"],
        "metadata": metadata,
        "backends": {},
        "config": {},
        "rows": [],
        "errors": list(failures),
        "failed_backends": [failure["backend"] for failure in failures],
    }
    for document in documents:
        merged["backends"].update(document["backends"])
        merged["config"].update(document["config"])
        merged["rows"].extend(document["rows"])
        merged["errors"].extend(document["errors"])
    return merged


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TimingStats:
    """Summary of the wall times of repeated calls, in seconds.

    Attributes:
        median_s: Median time of one call, the number to compare.
        p25_s: 25th percentile.
        p75_s: 75th percentile.
        min_s: Fastest call.
        repeats: Number of timed calls.
    """

    median_s: float
    p25_s: float
    p75_s: float
    min_s: float
    repeats: int

    @classmethod
    def from_samples(cls, samples):
        samples = np.asarray(samples, dtype=float)
        p25, median, p75 = np.percentile(samples, [25, 50, 75])
        return cls(
            median_s=float(median),
            p25_s=float(p25),
            p75_s=float(p75),
            min_s=float(samples.min()),
            repeats=int(samples.size),
        )


def time_call(function):
    """Seconds taken by one call of `function()`."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def time_alternating(
    callables,
    warmup_calls=2,
    min_repeats=5,
    max_repeats=50,
    budget_s=10.0,
):
    """Times several callables in alternation and returns their medians.

    Each callable is first called `warmup_calls` times untimed: callers that
    want the compilation time time a first call themselves with `time_call`.
    Then the callables are called in rounds, one call each per round, so that
    slow drifts of the machine (other processes, clock frequency, memory
    fragmentation) hit all of them alike; the order within a round rotates so
    that none of them always runs right after the same one. The garbage
    collector is paused while timing.

    Args:
        callables: Mapping from a name to a function of no arguments that
            returns only once its computation is finished (it synchronises
            with the device itself).
        warmup_calls: Untimed calls of each callable before timing, at least
            one.
        min_repeats: Fewest timed rounds.
        max_repeats: Most timed rounds.
        budget_s: Time to spend on the timed rounds; the number of rounds is
            estimated from the last warm-up round, between the two bounds.

    Returns:
        A dict mapping each name to its `TimingStats`.
    """
    names = list(callables)
    last_call_s = {}
    for name in names:
        for _ in range(max(warmup_calls, 1)):
            last_call_s[name] = time_call(callables[name])
    round_s = max(sum(last_call_s.values()), 1e-9)
    repeats = int(np.clip(budget_s // round_s, min_repeats, max_repeats))

    samples = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(time_call(callables[name]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: TimingStats.from_samples(samples[name]) for name in names}


# ---------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------


class PeakMemoryTracker:
    """Measures how much memory a block of code needs at its peak.

    On a GPU or TPU this is the backend allocator's peak of bytes in use; on
    a CPU it is the peak resident set size (RSS) of the process, reset with
    `/proc/self/clear_refs` (Linux). Both are reported as growth over the
    value just before the block, so that what already lived (weights, inputs)
    is not counted.

    The peak of JAX's accelerator allocator cannot be reset, nor the RSS peak
    where `/proc/self/clear_refs` is not writable: `resettable` is then
    `False`, and each measurement needs a fresh process.

    RSS only falls when the C allocator returns freed memory to the system;
    run CPU measurements with `MALLOC_MMAP_THRESHOLD_` set low (see
    `CPU_MEMORY_ENVIRONMENT`) so that it does at once.

    Args:
        backend: The Keras backend.
        accelerator_kind: `"cpu"`, `"gpu"` or `"tpu"`, as given by
            `detect_accelerator`.
    """

    def __init__(self, backend, accelerator_kind):
        self.backend = backend
        self.on_cpu = accelerator_kind == "cpu"
        self._baseline = 0
        if self.on_cpu:
            self.method = "peak RSS growth (process, Linux VmHWM)"
            self.resettable = _can_reset_peak_rss()
        elif backend == "torch":
            self.method = "torch.cuda.max_memory_allocated growth"
            self.resettable = True
        elif backend == "tensorflow":
            self.method = "tf get_memory_info('GPU:0')['peak'] growth"
            self.resettable = True
        else:
            self.method = "jax memory_stats()['peak_bytes_in_use'] growth"
            self.resettable = False

    def start(self):
        """Resets the peak (where possible) and records the baseline."""
        if self.resettable:
            self._reset_peak()
        self._baseline = self._current_bytes()

    def peak_growth_bytes(self):
        """Peak bytes in use since `start`, minus the baseline."""
        return max(self._peak_bytes() - self._baseline, 0)

    def _reset_peak(self):
        if self.on_cpu:
            _reset_peak_rss()
        elif self.backend == "torch":
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self.backend == "tensorflow":
            import tensorflow as tf

            tf.config.experimental.reset_memory_stats("GPU:0")

    def _current_bytes(self):
        if self.on_cpu:
            return _proc_status_bytes("VmRSS")
        if self.backend == "torch":
            import torch

            return torch.cuda.memory_allocated()
        if self.backend == "tensorflow":
            import tensorflow as tf

            return tf.config.experimental.get_memory_info("GPU:0")["current"]
        return _jax_memory_stats()["bytes_in_use"]

    def _peak_bytes(self):
        if self.on_cpu:
            return _proc_status_bytes("VmHWM")
        if self.backend == "torch":
            import torch

            return torch.cuda.max_memory_allocated()
        if self.backend == "tensorflow":
            import tensorflow as tf

            return tf.config.experimental.get_memory_info("GPU:0")["peak"]
        return _jax_memory_stats()["peak_bytes_in_use"]


# glibc serves allocations above this many bytes with their own mmap and
# unmaps them on free, so the RSS follows the live memory. Setting it also
# turns off glibc's dynamic threshold, which would otherwise keep freed
# buffers of up to 32 MiB in the heap.
CPU_MEMORY_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _proc_status_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} is not in /proc/self/status")


def _reset_peak_rss():
    # Writing "5" resets the high-water mark to the current RSS (Linux 4.0+).
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _can_reset_peak_rss():
    try:
        _reset_peak_rss()
        _proc_status_bytes("VmHWM")
    except (OSError, RuntimeError):
        return False
    return True


def _jax_memory_stats():
    import jax

    return jax.devices()[0].memory_stats() or {}
