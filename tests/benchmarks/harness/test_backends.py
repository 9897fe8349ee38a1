import os
from pathlib import Path

from benchmarks.harness.backends import child_environment


def test_child_environment_puts_the_repository_root_on_the_path(
    monkeypatch,
):
    # So that `python -m benchmarks` works in the child from any directory.
    monkeypatch.setenv("PYTHONPATH", "elsewhere")
    environment = child_environment("torch", EXTRA="1")
    root, rest = environment["PYTHONPATH"].split(os.pathsep)
    assert (Path(root) / "benchmarks" / "__main__.py").is_file()
    assert rest == "elsewhere"
    assert environment["KERAS_BACKEND"] == "torch"
    assert environment["EXTRA"] == "1"
