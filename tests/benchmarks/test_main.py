import importlib

import pytest

from benchmarks import __main__ as entry_point


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
