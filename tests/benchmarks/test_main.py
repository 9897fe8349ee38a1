import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import __main__ as entry_point

REPOSITORY_ROOT = Path(entry_point.__file__).resolve().parents[1]


def test_every_registered_suite_has_a_main():
    for module_name in entry_point.SUITES.values():
        assert callable(importlib.import_module(module_name).main)


def test_help_lists_suites(capsys):
    assert entry_point.main(["--help"]) == 0
    assert "layer_speed" in capsys.readouterr().out


def test_suite_help_shows_suite_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        entry_point.main(["layer_speed", "--help"])
    assert exit_info.value.code == 0
    assert "--shared-key-dims" in capsys.readouterr().out


def test_unknown_suite_is_rejected():
    with pytest.raises(SystemExit):
        entry_point.main(["no_such_suite"])


def test_suite_modules_do_not_import_keras():
    # `python -m benchmarks <suite> --backend-all` imports the suite in a
    # parent process that must stay backend-free.
    code = (
        "import sys, benchmarks.__main__ as m, importlib\n"
        "for name in m.SUITES.values(): importlib.import_module(name)\n"
        "assert 'keras' not in sys.modules, 'keras imported'\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=REPOSITORY_ROOT
    )
