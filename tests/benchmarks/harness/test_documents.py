from benchmarks.harness.documents import merge_documents
from benchmarks.harness.documents import new_document
from benchmarks.harness.markdown import errors_markdown
from benchmarks.harness.metadata import collect_metadata


def test_merge_documents_concatenates_backends():
    metadata = collect_metadata("suite", quick=True, backend="jax")
    first = new_document("suite", metadata, {"n": 1})
    first["rows"].append({"backend": "jax", "x": 1})
    second = new_document("suite", {**metadata, "backend": "torch"}, {"n": 2})
    second["rows"].append({"backend": "torch", "x": 2})
    failure = {"backend": "tensorflow", "message": "failed"}
    merged = merge_documents(
        [first, second], [failure], collect_metadata("suite", True)
    )
    assert set(merged["backends"]) == {"jax", "torch"}
    assert [row["x"] for row in merged["rows"]] == [1, 2]
    assert merged["failed_backends"] == ["tensorflow"]
    assert "tensorflow" in errors_markdown(merged)
