import keras
import numpy as np
import pytest

from benchmarks import common
from benchmarks import stdlib_text
from benchmarks import training


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


def test_summarize_averages_seeds():
    rows = [
        {
            "backend": "jax",
            "variant": "collaborative",
            "total_key_dim": 16,
            "seed": seed,
            "validation_loss": loss,
            "fit_s": 1.0,
            "step_ms": None,
            "attention_parameters": 10,
        }
        for seed, loss in enumerate([2.0, 3.0])
    ]
    (entry,) = training.summarize(rows)
    assert entry["validation_loss"] == pytest.approx(2.5)
    assert entry["validation_loss_min"] == 2.0
    assert entry["validation_bpc"] == pytest.approx(2.5 / np.log(2))
    assert entry["seeds"] == 2
    assert entry["step_ms"] is None


def test_report_writes_table_and_plot(tmp_path):
    metadata = common.collect_metadata("training", True, backend="jax")
    document = common.new_document("training", metadata, training.QUICK)
    for variant, loss in zip(training.VARIANTS, (2.5, 2.4)):
        for dim in (64, 16):
            document["rows"].append(
                {
                    "backend": "jax",
                    "variant": variant,
                    "total_key_dim": dim,
                    "seed": 0,
                    "validation_loss": loss,
                    "validation_bpc": loss / np.log(2),
                    "fit_s": 1.0,
                    "step_ms": 10.0,
                    "attention_parameters": 100,
                }
            )
    training.report(document, str(tmp_path), "training_jax")
    markdown = (tmp_path / "training_jax.md").read_text()
    assert "-0.1000" in markdown
    assert (tmp_path / "training_jax.png").stat().st_size > 0


@pytest.mark.parametrize("variant", training.VARIANTS)
def test_language_model_runs_at_a_small_key_size(variant):
    from benchmarks import char_lm

    factory = {
        "concatenated": char_lm.concatenated_attention,
        "collaborative": char_lm.collaborative_attention,
    }[variant]
    model = char_lm.build_language_model(
        factory(num_heads=2, total_key_dim=4, value_dim=8),
        seq_len=6,
        vocabulary_size=stdlib_text.VOCABULARY_SIZE,
        width=16,
        depth=1,
    )
    logits = model(np.zeros((2, 6), dtype="int32"))
    assert tuple(logits.shape) == (2, 6, stdlib_text.VOCABULARY_SIZE)
    assert keras.ops.all(keras.ops.isfinite(logits))
