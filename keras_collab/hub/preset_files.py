"""Preset folders written atomically, and the conversion report in them."""

import contextlib
import json
import os
import shutil
import tempfile

REPORT_FILE = "keras_collab_report.json"


@contextlib.contextmanager
def atomic_directory(output, force=False):
    """Yields a temporary directory that becomes `output` on success.

    The temporary directory sits next to `output` (same filesystem, so the
    final rename is atomic). On any error it is deleted and `output` is left
    as it was. An existing `output` is refused unless `force`; with `force`
    it is replaced only once the new one is complete.
    """
    output = os.path.abspath(output)
    if os.path.exists(output) and not force:
        raise FileExistsError(
            f"Output '{output}' exists; pass --force to replace it."
        )
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(
        prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=parent
    )
    try:
        yield staging
        if os.path.exists(output):
            retired = staging + ".old"
            os.rename(output, retired)
            os.rename(staging, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_report(directory, report):
    with open(os.path.join(directory, REPORT_FILE), "w") as file:
        json.dump(report, file, indent=2)


def read_report(directory):
    path = os.path.join(directory, REPORT_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"'{directory}' is not a keras-collab preset (no {REPORT_FILE})."
        )
    with open(path) as file:
        return json.load(file)
