import numpy as np

from benchmarks.workloads import stdlib_text


def test_corpus_splits_by_file_deterministically():
    corpus = stdlib_text.load_corpus()
    again = stdlib_text.load_corpus()
    assert corpus.validation_files == again.validation_files
    assert not set(corpus.train_files) & set(corpus.validation_files)
    assert len(corpus.train_files) > 5 * len(corpus.validation_files)
    assert corpus.train.max() < stdlib_text.VOCABULARY_SIZE


def test_encode_replaces_non_ascii():
    assert stdlib_text.decode(stdlib_text.encode("aé\n")) == "a?\n"


def test_windows_targets_are_inputs_shifted():
    codes = np.arange(100, dtype=np.uint8)
    inputs, targets = stdlib_text.random_windows(codes, 8, 5, seed=0)
    assert inputs.shape == targets.shape == (5, 8)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    again, _ = stdlib_text.random_windows(codes, 8, 5, seed=0)
    np.testing.assert_array_equal(inputs, again)
    evenly, _ = stdlib_text.evenly_spaced_windows(codes, 8, 3)
    assert evenly[0, 0] == 0 and evenly[-1, -1] == 98
