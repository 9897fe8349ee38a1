"""Result documents and resolved options of the conversion suites' tests."""

import argparse

from benchmarks.harness.documents import new_document
from benchmarks.harness.metadata import collect_metadata


def document_for(module, suite, rows, **config):
    metadata = collect_metadata(suite, True, backend="jax")
    document = new_document(suite, metadata, {**module.QUICK, **config})
    document["rows"] = [{"backend": "jax", **row} for row in rows]
    return document


def resolved_config(module, argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    module.add_arguments(parser)
    return module.resolve_config(parser.parse_args(argv))
