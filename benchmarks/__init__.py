"""Benchmarks of keras-collab, run with `python -m benchmarks <suite>`.

See `benchmarks/README.md` for the suites, how to run them on CPU, GPU and
TPU, and where their results land.
"""
