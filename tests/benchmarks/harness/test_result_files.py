import json
import os

import numpy as np
import pytest

from benchmarks.harness.result_files import default_output_dir
from benchmarks.harness.result_files import result_path
from benchmarks.harness.result_files import write_json


def test_write_json_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_json(path, {"value": np.float32(1.5), "array": np.arange(2)})
    assert json.loads(path.read_text()) == {"value": 1.5, "array": [0, 1]}
    assert os.listdir(path.parent) == ["result.json"]
    # mkstemp's private mode is not kept.
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"old": True})
    with pytest.raises(TypeError):
        write_json(path, {"new": object()})
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["result.json"]


def test_results_stay_in_benchmarks_results():
    full, quick = default_output_dir(False), default_output_dir(True)
    assert full.parts[-2:] == ("benchmarks", "results")
    assert (full / "fidelity_jax.json").is_file()
    assert quick == full / "quick"
    assert result_path(full, "fidelity", "all", ".md") == (
        full / "fidelity_all.md"
    )
