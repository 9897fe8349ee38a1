"""The command line's first screen: no backend start-up noise, and the
report says which Keras backend ran and how to pick another."""

import json
import os
import subprocess
import sys

import pytest

from keras_collab import cli
from tests.conftest import BACKEND

pytest.importorskip("keras_hub")

NOISE = ("cuda", "onednn", "i0000", "absl::initializelog", "cpu_feature")


def _run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _convert(tiny_preset, output, *extra):
    return [
        "convert",
        tiny_preset,
        "--shared-key-dim",
        "8",
        "--no-calibration",
        "--sequence-length",
        "32",
        "--output",
        str(output),
        *extra,
    ]


def test_reports_name_the_backend(tiny_preset, tmp_path, capsys):
    output = tmp_path / "converted"
    code, out, err = _run(capsys, *_convert(tiny_preset, output, "--json"))
    assert code == 0, err
    report = json.loads(out)
    assert report["backend"] == BACKEND
    others = [name for name in cli.BACKENDS if name != BACKEND]
    for name in others:
        assert f"KERAS_BACKEND={name}" in report["backend_hint"]
    # The saved report records the conversion's backend.
    code, out, err = _run(capsys, "report", str(output))
    assert code == 0, err
    line = f"Keras backend: {BACKEND} ({cli.backend_hint(BACKEND)})"
    assert line in out.splitlines()


def test_report_of_another_backend_names_both():
    report = {"backend": "jax", "backend_hint": cli.backend_hint("jax")}
    assert cli._backend_lines({**report, "conversion_backend": "torch"}) == [
        f"Keras backend: jax ({cli.backend_hint('jax')}); converted on torch"
    ]
    assert cli._backend_lines({}) == []  # reports from before the field


def test_quiet_environment_keeps_what_the_user_set():
    environ = {"TF_CPP_MIN_LOG_LEVEL": "0"}
    assert cli.quiet_environment(environ) == []
    assert environ == {"TF_CPP_MIN_LOG_LEVEL": "0"}
    environ = {}
    assert cli.quiet_environment(environ) == ["TF_CPP_MIN_LOG_LEVEL"]
    assert environ == cli.QUIET_ENVIRONMENT


STARTUP = (
    "WARNING: All log messages before absl::InitializeLog() is called are "
    "written to STDERR\n"
    "I0000 00:00:1796125473.176341   29044 port.cc:153] oneDNN custom "
    "operations are on.\n"
    "I0000 00:00:1796125473.179938   29044 cudart_stub.cc:31] Could not find "
    "cuda drivers on your machine, GPU will not be used.\n"
    "I0000 00:00:1796125496.611159   29162 cpu_feature_guard.cc:227] This "
    "TensorFlow binary is optimized to use available CPU instructions.\n"
    "To enable the following instructions: AVX2 FMA, in other operations, "
    "rebuild TensorFlow with the appropriate compiler flags.\n"
)
KEPT = (
    "W0000 00:00:1796125496.611159   29162 allocator.cc:1] Allocation of "
    "1000 exceeds 10% of free system memory.\n"
    "UserWarning: a warning that matters\n"
)


def _unset_log_level(monkeypatch):
    # Set first, so that the variable is removed again after the test (the
    # context sets it; `delenv` of an unset variable records nothing).
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "unset by the test")
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")


def test_startup_noise_is_dropped_and_the_rest_kept(capfd, monkeypatch):
    _unset_log_level(monkeypatch)
    with cli.quiet_backend_startup():
        os.write(2, STARTUP.encode())  # as the C++ libraries do
        os.write(2, KEPT.encode())
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    assert capfd.readouterr().err == KEPT


def test_a_user_log_level_shows_everything(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    with cli.quiet_backend_startup():
        os.write(2, STARTUP.encode())
    assert capfd.readouterr().err == STARTUP
    with cli.quiet_backend_startup(enabled=False):
        os.write(2, STARTUP.encode())
    assert capfd.readouterr().err == STARTUP


def test_errors_inside_still_restore_stderr(capfd, monkeypatch):
    _unset_log_level(monkeypatch)
    with pytest.raises(ImportError):
        with cli.quiet_backend_startup():
            os.write(2, KEPT.encode())
            raise ImportError("no such backend")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == KEPT + "after\n"


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="one backend is enough: KerasHub imports TensorFlow (the source "
    "of the start-up lines) on every backend, and TensorFlow's own backend "
    "adds the most",
)
def test_command_line_stderr_has_no_backend_noise(tiny_preset, tmp_path):
    environ = {**os.environ, "KERAS_BACKEND": BACKEND}
    environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
    done = subprocess.run(
        [sys.executable, "-m", "keras_collab"]
        + _convert(tiny_preset, tmp_path / "out"),
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    noisy = [
        line
        for line in done.stderr.splitlines()
        if any(word in line.lower() for word in NOISE)
    ]
    assert noisy == []
    assert f"Keras backend: {BACKEND} (" in done.stdout
