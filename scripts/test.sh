#!/usr/bin/env bash
# Sets up everything on a fresh machine and runs the whole test suite once per
# Keras backend, each in its own process (KERAS_BACKEND is read when keras is
# imported), with the package's doctests, after a ruff lint and format
# check. Fails if any of them fails.
#
#   bash scripts/test.sh              # tensorflow, jax and torch
#   bash scripts/test.sh jax -k mask  # one backend, extra pytest arguments
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh || exit 1

backends=(tensorflow jax torch)
if [[ $# -gt 0 && "$1" =~ ^(tensorflow|jax|torch)$ ]]; then
  backends=("$1")
  shift
fi

failed=()
# Lint and formatting once (they do not depend on the backend).
echo "=== ruff ==="
if ! .venv/bin/ruff check . || ! .venv/bin/ruff format --check .; then
  failed+=("ruff")
fi
for backend in "${backends[@]}"; do
  echo "=== KERAS_BACKEND=$backend ==="
  if ! KERAS_BACKEND="$backend" .venv/bin/python -m pytest -q "$@"; then
    failed+=("$backend")
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "All backends passed: ${backends[*]}"
