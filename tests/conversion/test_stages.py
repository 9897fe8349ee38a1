"""The stages of `convert_model`: their wall times, and the decomposition
of every layer side by side (one layer per core)."""

import numpy as np
import pytest

from keras_collab.conversion import convert_attention
from keras_collab.conversion import convert_model
from keras_collab.conversion import find_sites
from keras_collab.conversion import model as model_lib
from keras_collab.conversion.calibration import collect_statistics
from keras_collab.conversion.progress import STAGES
from keras_collab.conversion.progress import StageClock
from keras_collab.conversion.progress import format_stage_seconds

keras_hub = pytest.importorskip("keras_hub")
RNG = np.random.default_rng(5)


def _bert(num_layers=3):
    return keras_hub.models.BertBackbone(
        vocabulary_size=40,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
    )


def _batch(length=8):
    mask = np.ones((2, length), bool)
    mask[1, length // 2 :] = False
    return {
        "token_ids": RNG.integers(1, 40, size=(2, length)),
        "padding_mask": mask,
        "segment_ids": np.zeros((2, length), "int32"),
    }


def _check_split(times, seconds):
    assert list(times) == [*STAGES, "other", "total"]
    assert times["total"] == seconds
    assert all(value >= 0.0 for value in times.values())
    parts = sum(value for name, value in times.items() if name != "total")
    assert parts == pytest.approx(times["total"], rel=1e-9)


def test_stage_seconds_add_up_to_the_conversion_time():
    backbone = _bert()
    result = convert_model(
        backbone,
        4,
        calibration_data=[_batch(), _batch(16)],
        refine_steps=2,
        distill_steps=2,
    )
    times = result.stage_seconds
    _check_split(times, result.seconds)
    for stage in STAGES:
        assert times[stage] > 0.0, stage


def test_stages_that_do_not_run_take_no_time():
    result = convert_model(_bert(), 4)
    times = result.stage_seconds
    _check_split(times, result.seconds)
    assert times["calibration"] == 0.0
    assert times["refinement"] == times["distillation"] == 0.0
    assert times["decomposition"] > 0.0 and times["assembly"] > 0.0


def test_stage_clock_refuses_unknown_stages():
    with pytest.raises(ValueError, match="solving"):
        with StageClock().stage("solving"):
            pass


def test_format_stage_seconds_leaves_out_stages_that_did_not_run():
    line = format_stage_seconds(
        {
            "calibration": 0.0,
            "decomposition": 2.0,
            "assembly": 0.25,
            "refinement": 0.0,
            "distillation": 3.5,
            "other": 0.0,
            "total": 5.75,
        }
    )
    assert line == "decomposition 2.0 s, assembly 0.2 s, distillation 3.5 s"


@pytest.mark.parametrize("workers", [1, 2])
def test_side_by_side_decomposition_equals_one_layer_at_a_time(
    monkeypatch, workers
):
    """Layers decomposed in worker threads (BLAS single-threaded) give the
    factors `convert_attention` gives for each layer alone."""
    monkeypatch.setattr(model_lib, "_available_cores", lambda: workers)
    backbone = _bert()
    sites = find_sites(backbone)
    statistics = collect_statistics(backbone, sites, [_batch()])
    together = model_lib.convert_sites(sites, 5, statistics=statistics)
    assert list(together) == [site.path for site in sites]
    for site in sites:
        alone = convert_attention(
            site.layer,
            5,
            calibration=statistics[site.path],
            tol=1e-6,
            max_iter=300,
        )
        converted = together[site.path]
        assert converted.iterations == alone.iterations
        assert converted.relative_error == pytest.approx(
            alone.relative_error, rel=1e-6
        )
        for got, want in zip(
            converted.layer.get_weights(), alone.layer.get_weights()
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_failing_layer_is_reported():
    backbone = _bert()
    sites = find_sites(backbone)
    with pytest.raises(ValueError, match="shared_key_dim"):
        model_lib.convert_sites(sites, {sites[0].path: 4})
