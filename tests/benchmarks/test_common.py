import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common


def test_markdown_table_aligns_numbers_and_formats_cells():
    table = common.markdown_table(
        ["name", "value:"], [("a|b", 1.23456), ("c", None)]
    )
    lines = table.splitlines()
    assert lines[0] == "| name | value |"
    assert lines[1] == "| --- | ---: |"
    assert lines[2] == "| a\\|b | 1.23 |"
    assert lines[3] == "| c | - |"


def test_write_json_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "result.json"
    common.write_json(path, {"value": np.float32(1.5), "array": np.arange(2)})
    assert json.loads(path.read_text()) == {"value": 1.5, "array": [0, 1]}
    assert os.listdir(path.parent) == ["result.json"]
    # mkstemp's private mode is not kept.
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "result.json"
    common.write_json(path, {"old": True})
    with pytest.raises(TypeError):
        common.write_json(path, {"new": object()})
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["result.json"]


def test_time_alternating_rotates_and_bounds_repeats():
    calls = []
    callables = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    stats = common.time_alternating(
        callables, warmup_calls=1, min_repeats=4, max_repeats=4, budget_s=1.0
    )
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    timed = calls[3:]
    assert timed[:6] == ["a", "b", "c", "b", "c", "a"]
    assert all(stats[name].repeats == 4 for name in "abc")
    assert stats["a"].min_s <= stats["a"].median_s <= stats["a"].p75_s


def test_timing_stats_median():
    stats = common.TimingStats.from_samples([3.0, 1.0, 2.0])
    assert stats.median_s == 2.0
    assert stats.min_s == 1.0
    assert stats.repeats == 3


def test_merge_documents_concatenates_backends():
    metadata = common.collect_metadata("suite", quick=True, backend="jax")
    first = common.new_document("suite", metadata, {"n": 1})
    first["rows"].append({"backend": "jax", "x": 1})
    second = common.new_document(
        "suite", {**metadata, "backend": "torch"}, {"n": 2}
    )
    second["rows"].append({"backend": "torch", "x": 2})
    failure = {"backend": "tensorflow", "message": "failed"}
    merged = common.merge_documents(
        [first, second], [failure], common.collect_metadata("suite", True)
    )
    assert set(merged["backends"]) == {"jax", "torch"}
    assert [row["x"] for row in merged["rows"]] == [1, 2]
    assert merged["failed_backends"] == ["tensorflow"]
    assert "tensorflow" in common.errors_markdown(merged)


def test_config_with_options_overrides_only_the_options_given():
    full = {"steps": 100, "seeds": [0, 1], "minilm_layers": None}
    quick = {**full, "steps": 10}
    args = argparse.Namespace(quick=True, steps=None, seeds=[2], layers=[0])
    config = common.config_with_options(args, full, quick, ("steps", "seeds"))
    assert config == {"steps": 10, "seeds": [2], "minilm_layers": None}
    assert quick["seeds"] == [0, 1]  # a copy: the next run starts afresh
    mapped = common.config_with_options(
        args, full, quick, {"layers": "minilm_layers"}
    )
    assert mapped["minilm_layers"] == [0]


def test_integers_option_can_be_emptied():
    assert common.integers("96,192") == [96, 192]
    assert common.integers("") == []


def test_suite_run_saves_document_and_writes_report(tmp_path, capsys):
    args = argparse.Namespace(quick=True, output_dir=str(tmp_path))
    config = {"n": 1}
    run = common.start_run("suite", args, config, time.perf_counter())
    config["added_later"] = True  # saved too: the document holds config
    run.document["rows"].append({"backend": run.backend, "x": 1})
    stems = []
    status = run.finish(lambda document, output_dir, stem: stems.append(stem))
    assert status == 0 and stems == [f"suite_{run.backend}"]
    saved = common.read_json(tmp_path / f"suite_{run.backend}.json")
    assert saved["rows"] == [{"backend": run.backend, "x": 1}]
    assert saved["config"][run.backend] == {"n": 1, "added_later": True}
    assert saved["metadata"]["quick"] and "wall_time_s" in saved["metadata"]
    assert f"suite on {run.backend}: " in capsys.readouterr().out


def test_metadata_describes_the_machine():
    metadata = common.collect_metadata("suite", quick=False, backend="jax")
    assert metadata["cpu_model"]
    assert metadata["versions"]["keras"]
    assert metadata["date"].endswith("+00:00")
    json.dumps(metadata)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self"
)
def test_cpu_peak_memory_tracker_sees_a_large_allocation():
    tracker = common.PeakMemoryTracker("jax", "cpu")
    if not tracker.resettable:
        pytest.skip("/proc/self/clear_refs is not writable")
    tracker.start()
    block = np.ones(8 * 2**20)  # 64 MiB, served by mmap and touched
    del block
    assert tracker.peak_growth_bytes() >= 60 * common.MIB


def test_suite_modules_do_not_import_keras():
    # `python -m benchmarks <suite> --backend-all` imports the suite in a
    # parent process that must stay backend-free.
    code = (
        "import sys, benchmarks.__main__ as m, importlib\n"
        "for name in m.SUITES.values(): importlib.import_module(name)\n"
        "assert 'keras' not in sys.modules, 'keras imported'\n"
    )
    repository_root = Path(common.__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=repository_root
    )
