"""The README's layout section is the one `scripts/layout.py` generates from
the package tree."""

import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "layout.py"


def test_readme_layout_is_current():
    spec = importlib.util.spec_from_file_location("layout", SCRIPT)
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    assert layout.readme_section() == layout.layout()
