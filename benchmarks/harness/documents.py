"""The result document every suite writes, one per run.

```
{
    "suite": "layer_speed",
    "metadata": {...},          # the process that wrote the document
    "backends": {"jax": {...}}, # metadata of each process that measured
    "config": {"jax": {...}},   # what each backend was asked to measure
    "rows": [{"backend": "jax", ...}, ...],
    "errors": [{"backend": "jax", "message": "..."}, ...],
}
```

so that documents from several backends merge by concatenating their rows.
"""


def new_document(suite, metadata, config):
    """An empty result document for one backend (see the module docstring)."""
    backend = metadata["backend"]
    return {
        "suite": suite,
        "metadata": metadata,
        "backends": {backend: metadata},
        "config": {backend: config},
        "rows": [],
        "errors": [],
    }


def merge_documents(documents, failures, metadata):
    """Merges per-backend result documents into one (module docstring).

    Args:
        documents: Result documents of the backends that succeeded.
        failures: Error dicts of the backends that failed.
        metadata: Metadata of the process that merges.
    """
    merged = {
        "suite": metadata["suite"],
        "metadata": metadata,
        "backends": {},
        "config": {},
        "rows": [],
        "errors": list(failures),
        "failed_backends": [failure["backend"] for failure in failures],
    }
    for document in documents:
        merged["backends"].update(document["backends"])
        merged["config"].update(document["config"])
        merged["rows"].extend(document["rows"])
        merged["errors"].extend(document["errors"])
    return merged
