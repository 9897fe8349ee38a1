import json

from benchmarks.harness.metadata import collect_metadata


def test_metadata_describes_the_machine():
    metadata = collect_metadata("suite", quick=False, backend="jax")
    assert metadata["cpu_model"]
    assert metadata["versions"]["keras"]
    assert metadata["date"].endswith("+00:00")
    json.dumps(metadata)
