import argparse
import time

from benchmarks.harness.result_files import read_json
from benchmarks.harness.run import start_run


def test_suite_run_saves_document_and_writes_report(tmp_path, capsys):
    args = argparse.Namespace(quick=True, output_dir=str(tmp_path))
    config = {"n": 1}
    run = start_run("suite", args, config, time.perf_counter())
    config["added_later"] = True  # saved too: the document holds config
    run.document["rows"].append({"backend": run.backend, "x": 1})
    stems = []
    status = run.finish(lambda document, output_dir, stem: stems.append(stem))
    assert status == 0 and stems == [f"suite_{run.backend}"]
    saved = read_json(tmp_path / f"suite_{run.backend}.json")
    assert saved["rows"] == [{"backend": run.backend, "x": 1}]
    assert saved["config"][run.backend] == {"n": 1, "added_later": True}
    assert saved["metadata"]["quick"] and "wall_time_s" in saved["metadata"]
    assert f"suite on {run.backend}: " in capsys.readouterr().out
