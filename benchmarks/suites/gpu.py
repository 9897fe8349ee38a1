"""The GPU set: `layer_speed` on every backend, in under 8 minutes on one GPU.

Runs `layer_speed` once per backend (JAX, TensorFlow, then PyTorch), each in
its own process, at the accelerator configuration: batch 8, T in {128, 512,
2048}, D̃ in {768, 384, 192, 96}, forward and forward+backward, PyTorch eager
and `torch.compile` (at the target D̃ only). Peak memory is measured for
MHA and the target D̃ only: JAX's accelerator peak cannot be reset, so each
of those measurements costs a fresh process.

To stay within the time budget, each backend gets a `--deadline-s` from the
time left: timing groups that would start later are skipped and listed in
the results. Groups run in order of importance (the compiled variant before
`torch.compile`, short sequences before long ones), so a deadline only cuts
the longest sequences or the `torch.compile` variant.

Results: `<output dir>/gpu/layer_speed_{jax,tensorflow,torch,all}.*`.
"""

import time
from pathlib import Path

from benchmarks.harness.backends import run_backend_subprocesses
from benchmarks.harness.backends import save_merged
from benchmarks.harness.metadata import collect_metadata
from benchmarks.suites import layer_speed

# `__main__` leaves `--backend-all` to this module: it always runs them all.
RUNS_ITS_OWN_BACKENDS = True

# Under 8 minutes, with a margin for what a deadline cannot stop.
TOTAL_BUDGET_S = 450
# What each backend needs besides its timing groups: start-up, the group
# running when its deadline passes, and the memory probe.
RESERVE_PER_BACKEND_S = 75
# Fastest first: time a backend does not use goes to those after it.
BACKEND_ORDER = ("jax", "tensorflow", "torch")
# Even a backend started late gets this long to time the T = 128 groups.
MIN_DEADLINE_S = 30
LAYER_SPEED_ARGUMENTS = [
    "--memory-shared-key-dims",
    str(layer_speed.TARGET_SHARED_KEY_DIM),
]


def main(args):
    start = time.perf_counter()
    # The merge is a layer_speed result; its command line says it came from
    # this suite.
    metadata = collect_metadata(layer_speed.SUITE, args.quick)
    output_dir = Path(args.output_dir) / "gpu"
    documents, failures = [], []
    for index, backend in enumerate(BACKEND_ORDER):
        deadline_s = _deadline_for_next_backend(
            time.perf_counter() - start, len(BACKEND_ORDER) - index
        )
        done, failed = run_backend_subprocesses(
            layer_speed.SUITE,
            [*LAYER_SPEED_ARGUMENTS, "--deadline-s", f"{deadline_s:.0f}"],
            [backend],
            output_dir,
            args.quick,
        )
        documents += done
        failures += failed
    _flag_backends_without_accelerator(documents)
    merged = save_merged(
        documents, failures, output_dir, metadata, layer_speed.report, start
    )
    print(f"gpu: {merged['metadata']['wall_time_s']} s")
    return 1 if merged["failed_backends"] else 0


def _deadline_for_next_backend(elapsed_s, backends_left):
    """Timing seconds for the next backend: its share of the time left."""
    share = (TOTAL_BUDGET_S - elapsed_s) / backends_left
    return max(share - RESERVE_PER_BACKEND_S, MIN_DEADLINE_S)


def _flag_backends_without_accelerator(documents):
    """Adds an error to the results of each backend that ran on CPU."""
    for document in documents:
        for backend, metadata in document["backends"].items():
            if (metadata.get("device") or {}).get("kind", "cpu") == "cpu":
                message = "no GPU or TPU visible: measured on CPU"
                print(f"WARNING: {backend}: {message}")
                document["errors"].append(
                    {"backend": backend, "message": message}
                )
