"""Peak memory of attention passes, measured in a process of its own.

Started by `benchmarks.suites.layer_speed` as

```
KERAS_BACKEND=jax python -m benchmarks.suites.memory_probe \
    --items '[{"seq_len": 128, "shared_key_dim": null, "mode": ...}]' \
    --output memory.json
```

Each item is a layer (`shared_key_dim` null for Keras MHA; an optional
`shared_value_dim` for shared values) and a pass. The
pass is compiled and run twice, then run once more between the two readings
of a `benchmarks.harness.memory.PeakMemoryTracker`. The rows go to
`--output` as JSON.

It is a separate process because the CPU measurement needs the C allocator
to return freed memory at once (`harness.memory.CPU_MEMORY_ENVIRONMENT`),
which slows the timings down, and because some peaks cannot be reset.
"""

import argparse
import gc
import json
import sys

from benchmarks.harness.memory import MIB
from benchmarks.harness.memory import PeakMemoryTracker
from benchmarks.harness.metadata import detect_accelerator
from benchmarks.harness.result_files import write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=json.loads, required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    # Imported here, after the parent chose KERAS_BACKEND.
    import keras

    backend = keras.backend.backend()
    accelerator = detect_accelerator(backend)
    tracker = PeakMemoryTracker(backend, accelerator["kind"])
    if len(args.items) > 1 and not tracker.resettable:
        raise ValueError(
            f"{tracker.method} cannot be reset: measure one item per process."
        )
    rows = [
        _measure(item, backend, accelerator, tracker) for item in args.items
    ]
    write_json(args.output, {"rows": rows})
    return 0


def _measure(item, backend, accelerator, tracker):
    import keras

    from benchmarks.suites.layer_speed import KEY_DIM
    from benchmarks.suites.layer_speed import MODEL_DIM
    from benchmarks.suites.layer_speed import NUM_HEADS
    from benchmarks.workloads import attention_steps

    keras.utils.set_random_seed(item["seq_len"])
    inputs = keras.random.normal(
        (item["batch_size"], item["seq_len"], MODEL_DIM)
    )
    layer = attention_steps.build_attention(
        inputs,
        NUM_HEADS,
        KEY_DIM,
        item["shared_key_dim"],
        item.get("shared_value_dim"),
    )
    step = attention_steps.make_step(
        layer,
        inputs,
        item["mode"],
        item["variant"],
        on_accelerator=accelerator["kind"] != "cpu",
    )
    # Compilation, and the one-off allocations of the first calls, must not
    # count.
    step()
    step()
    gc.collect()
    tracker.start()
    step()
    peak_bytes = tracker.peak_growth_bytes()

    row = {
        "kind": "memory",
        "backend": backend,
        "device": accelerator["kind"],
        **item,
        "peak_mib": peak_bytes / MIB,
        "method": tracker.method,
    }
    if backend == "jax":
        buffer_bytes = attention_steps.jax_buffer_bytes(
            layer, inputs, item["mode"]
        )
        if buffer_bytes is not None:
            row["xla_buffers_mib"] = buffer_bytes / MIB
    print(
        f"memory {backend} T={item['seq_len']} "
        f"D̃={item['shared_key_dim']} D̃_v={item.get('shared_value_dim')}: "
        f"{row['peak_mib']:.1f} MiB",
        flush=True,
    )
    return row


if __name__ == "__main__":
    sys.exit(main())
