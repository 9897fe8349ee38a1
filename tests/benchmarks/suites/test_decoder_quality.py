"""The decoder_quality suite: its character GPT-2, a quick run end to end,
and the command line converting a character GPT-2 preset."""

import json

import numpy as np
import pytest

from benchmarks.__main__ import main as benchmarks_main
from benchmarks.harness.result_files import read_json
from benchmarks.suites import decoder_quality
from tests.benchmarks.suites.helpers import resolved_config

keras_hub = pytest.importorskip("keras_hub")

CODE = 'def f(x):\n    """Doc."""\n\treturn  x[1] + 2  # ok a1\n\n'


def _tiny_preset(directory):
    """An untrained character GPT-2 preset, as the suite's workload saves
    one."""
    from benchmarks.workloads import char_gpt2

    causal_lm = char_gpt2.build_causal_lm(
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=64,
    )
    causal_lm.save_to_preset(str(directory))
    return str(directory)


def test_char_tokenizer_is_one_token_per_character(tmp_path):
    import keras

    from benchmarks.workloads import char_gpt2
    from benchmarks.workloads import stdlib_text

    tokenizer = char_gpt2.char_tokenizer()
    ids = keras.ops.convert_to_numpy(tokenizer(CODE))
    np.testing.assert_array_equal(ids, stdlib_text.encode(CODE))
    assert tokenizer.detokenize(ids) == CODE
    assert tokenizer.end_token_id == char_gpt2.END_TOKEN_ID
    assert tokenizer.vocabulary_size() == char_gpt2.VOCABULARY_SIZE

    preset = _tiny_preset(tmp_path / "preset")
    reloaded = keras_hub.models.Tokenizer.from_preset(preset)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(reloaded(CODE)), ids
    )
    preprocessor = keras_hub.models.CausalLMPreprocessor.from_preset(preset)
    x, y, _ = preprocessor([CODE])
    token_ids = keras.ops.convert_to_numpy(x["token_ids"])[0]
    assert token_ids[0] == char_gpt2.END_TOKEN_ID
    np.testing.assert_array_equal(token_ids[1 : 1 + len(CODE)], ids)


def test_windows_put_the_start_token_first():
    from benchmarks.workloads import char_gpt2

    codes = np.arange(100, dtype=np.uint8)
    inputs, targets = char_gpt2.windows_at(codes, [0, 10], 5)
    np.testing.assert_array_equal(
        inputs["token_ids"], [[256, 0, 1, 2, 3], [256, 10, 11, 12, 13]]
    )
    np.testing.assert_array_equal(
        targets, [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]]
    )
    assert inputs["padding_mask"].all()


def test_agreement_counts_positions_prefixes_and_identical_rows():
    from benchmarks.workloads import char_gpt2

    measured = char_gpt2.agreement(
        [[1, 2, 3, 4], [1, 2, 3, 4]], [[1, 2, 3, 4], [1, 9, 3, 4]]
    )
    assert measured == {
        "token_agreement": 7 / 8,
        "prefix_agreement": (1 + 1 / 4) / 2,
        "identical": 0.5,
    }


def test_quick_run_end_to_end(tmp_path):
    assert (
        benchmarks_main(
            ["decoder_quality", "--quick", "--output-dir", str(tmp_path)]
        )
        == 0
    )
    (path,) = tmp_path.glob("decoder_quality_*.json")
    document = read_json(path)
    rows = {(r["shared_key_dim"], r["method"]): r for r in document["rows"]}
    config = next(iter(document["config"].values()))
    full = config["original"]["num_heads"] * config["original"]["head_dim"]
    assert set(rows) == {
        (full, "original"),
        (full, "activation_aware"),
        (full // 2, "activation_aware"),
        (full // 2, "distilled"),
    }
    original = rows[(full, "original")]
    exact = rows[(full, "activation_aware")]
    assert exact["perplexity"] == pytest.approx(
        original["perplexity"], rel=1e-4
    )
    assert exact["token_agreement"] == 1.0
    assert exact["identical"] == 1.0
    assert exact["top1_agreement"] == 1.0
    assert config["preset_record"]["points"]
    for row in rows.values():
        assert np.isfinite(row["perplexity"])
    distilled = rows[(full // 2, "distilled")]
    assert distilled["distillation"]["steps"] == config["distill_steps"]
    markdown = path.with_suffix(".md").read_text()
    assert "## Results on held-out text" in markdown
    assert path.with_suffix(".png").stat().st_size > 0


def test_options_override_the_configuration():
    config = resolved_config(
        decoder_quality,
        ["--divisors", "1,4", "--distill-steps", "0", "--steps", "7"],
    )
    assert config["divisors"] == [1, 4]
    assert config["distill_steps"] == 0
    assert config["training"]["steps"] == 7
    assert decoder_quality.FULL["training"]["steps"] == 2000
    quick = resolved_config(decoder_quality, ["--quick"])
    assert quick["preset"] is None


def test_cli_converts_the_char_lm_preset(tmp_path, capsys):
    from keras_collab import cli

    source = _tiny_preset(tmp_path / "char_gpt2")
    output = tmp_path / "converted"
    status = cli.main(
        [
            "convert",
            source,
            "--shared-key-dim",
            "8",
            "--output",
            str(output),
            "--samples",
            "16",
            "--json",
        ]
    )
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    assert {
        "mean_cosine",
        "min_cosine",
        "spearman_pairwise",
        "max_abs_difference",
        "texts",
    } <= set(report["fidelity"])
    assert [layer["shared_key_dim"] for layer in report["layers"]] == [8, 8]
    assert report["qk_params_after"] < report["qk_params_before"]
    # A character vocabulary has no words: no vocabulary texts by default,
    # and asking for them is refused.
    assert report["vocabulary_texts"] == 0
    refused = cli.main(
        ["convert", source, "--output", str(tmp_path / "refused")]
        + ["--samples", "16", "--vocabulary-texts", "4", "--no-speed"]
    )
    assert refused == 2
    assert "no plain word" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()

    converted = keras_hub.models.CausalLM.from_preset(str(output))
    assert type(converted).__name__ == "CollaborativeGPT2CausalLM"
    converted.compile(sampler="greedy")
    generated = converted.generate("def ", max_length=16)
    assert isinstance(generated, str) and generated.startswith("def ")


def test_value_divisors_cross_every_divisor():
    config = resolved_config(
        decoder_quality,
        ["--divisors", "1,4", "--value-divisors", "none,2"],
    )
    assert decoder_quality.grid(config, 128, 128) == [
        {"shared_key_dim": 128, "shared_value_dim": None},
        {"shared_key_dim": 128, "shared_value_dim": 64},
        {"shared_key_dim": 32, "shared_value_dim": None},
        {"shared_key_dim": 32, "shared_value_dim": 64},
    ]
    # The default keeps per-head values only, as before shared values.
    assert resolved_config(decoder_quality, [])["value_divisors"] == [None]
    with pytest.raises(SystemExit, match="not divisible"):
        decoder_quality.grid({**config, "value_divisors": [3]}, 128, 128)
    with pytest.raises(SystemExit, match="empty"):
        resolved_config(decoder_quality, ["--value-divisors", ""])


def test_quick_run_with_shared_values(tmp_path):
    assert (
        benchmarks_main(
            [
                "decoder_quality",
                "--quick",
                "--divisors",
                "1",
                "--value-divisors",
                "1,2",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    (path,) = tmp_path.glob("decoder_quality_*.json")
    document = read_json(path)
    config = next(iter(document["config"].values()))
    full = config["original"]["num_heads"] * config["original"]["head_dim"]
    rows = {
        (r["shared_value_dim"], r["method"]): r
        for r in document["rows"]
        if r["method"] != "original"
    }
    assert set(rows) == {
        (full, "activation_aware"),
        (full // 2, "activation_aware"),
        (full // 2, "distilled"),
    }
    original = next(r for r in document["rows"] if r["method"] == "original")
    # Full-size shared values are exact: the original's perplexity and
    # every greedy token.
    exact = rows[(full, "activation_aware")]
    assert exact["perplexity"] == pytest.approx(
        original["perplexity"], rel=1e-4
    )
    assert exact["token_agreement"] == 1.0
    assert exact["median_value_relative_error"] < 1e-5
    # Half-size values: fewer value/output parameters and a smaller cache
    # (full-size keys: D̃ + D̃_v per layer, against 2·H·d_k).
    half = rows[(full // 2, "activation_aware")]
    assert half["vo_params_after"] < exact["vo_params_after"]
    layers = config["original"]["num_layers"]
    assert half["cache_per_token"] == layers * (full + full // 2)
    assert half["original_cache_per_token"] == layers * 2 * full
    assert half["value_cache_share"] == pytest.approx(1 / 3)
    assert half["median_value_relative_error"] > 1e-3
    distilled = rows[(full // 2, "distilled")]
    assert distilled["distillation"]["steps"] == config["distill_steps"]
    markdown = path.with_suffix(".md").read_text()
    assert "| value share |" in markdown
    assert path.with_suffix(".png").stat().st_size > 0
