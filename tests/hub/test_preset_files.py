"""Atomic preset folders (`keras_collab.hub.preset_files`)."""

import os

import pytest

from keras_collab.hub import preset_files


def test_failed_conversion_leaves_nothing(tmp_path):
    output = tmp_path / "atomic"
    with pytest.raises(RuntimeError):
        with preset_files.atomic_directory(str(output)) as staging:
            open(os.path.join(staging, "partial"), "w").close()
            raise RuntimeError("interrupted")
    assert not output.exists()
    assert os.listdir(tmp_path) == []


def test_existing_output_is_kept_until_the_new_one_is_complete(tmp_path):
    output = tmp_path / "preset"
    output.mkdir()
    (output / "old").write_text("old")
    with pytest.raises(FileExistsError, match="--force"):
        with preset_files.atomic_directory(str(output)):
            pass
    with pytest.raises(RuntimeError):
        with preset_files.atomic_directory(str(output), force=True) as staging:
            open(os.path.join(staging, "new"), "w").close()
            raise RuntimeError("interrupted")
    assert os.listdir(output) == ["old"]
    with preset_files.atomic_directory(str(output), force=True) as staging:
        open(os.path.join(staging, "new"), "w").close()
    assert os.listdir(output) == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["preset"]
