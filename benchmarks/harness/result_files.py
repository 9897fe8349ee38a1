"""Result files: where they land, and atomic JSON and text writing."""

import json
import os
import tempfile
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
# Quick runs land apart so that they never overwrite full results.
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"


def default_output_dir(quick):
    return QUICK_RESULTS_DIR if quick else RESULTS_DIR


def result_path(output_dir, suite, backend, suffix):
    """Path of a result file: `<output_dir>/<suite>_<backend><suffix>`.

    `backend` is `"all"` for the merge of a `--backend-all` run.
    """
    return Path(output_dir) / f"{suite}_{backend}{suffix}"


def write_atomically(path, write):
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
    return write_atomically(path, lambda file: file.write(text.encode()))


def write_text(path, text):
    """Writes a text file atomically."""
    return write_atomically(path, lambda file: file.write(text.encode()))


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
