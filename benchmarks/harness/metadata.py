"""Metadata: where, when and how a result was measured.

Reporting the versions reads the installed distributions; only
`detect_accelerator` imports a backend library, when called.
"""

import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
import time
from pathlib import Path

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


def describe_device(metadata):
    """One-line description of the device in `metadata`, e.g. for a title."""
    device = metadata.get("device") or {}
    if device.get("kind", "cpu") == "cpu":
        return f"CPU {metadata['cpu_model']} ({metadata['cpus_usable']} cores)"
    count = device.get("count", 1)
    suffix = f" x{count}" if count > 1 else ""
    return f"{device['kind'].upper()} {device['name']}{suffix}"
