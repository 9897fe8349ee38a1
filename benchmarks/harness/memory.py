"""Peak memory of a block of code, on CPU (peak RSS) or an accelerator."""

MIB = 2**20


class PeakMemoryTracker:
    """Measures how much memory a block of code needs at its peak.

    On a GPU or TPU this is the backend allocator's peak of bytes in use; on
    a CPU it is the peak resident set size (RSS) of the process, reset with
    `/proc/self/clear_refs` (Linux). Both are reported as growth over the
    value just before the block, so that what already lived (weights, inputs)
    is not counted.

    The peak of JAX's accelerator allocator cannot be reset, nor the RSS peak
    where `/proc/self/clear_refs` is not writable: `resettable` is then
    `False`, and each measurement needs a fresh process.

    RSS only falls when the C allocator returns freed memory to the system;
    run CPU measurements with `MALLOC_MMAP_THRESHOLD_` set low (see
    `CPU_MEMORY_ENVIRONMENT`) so that it does at once.

    Args:
        backend: The Keras backend.
        accelerator_kind: `"cpu"`, `"gpu"` or `"tpu"`, as given by
            `metadata.detect_accelerator`.
    """

    def __init__(self, backend, accelerator_kind):
        self.backend = backend
        self.on_cpu = accelerator_kind == "cpu"
        self._baseline = 0
        if self.on_cpu:
            self.method = "peak RSS growth (process, Linux VmHWM)"
            self.resettable = _can_reset_peak_rss()
        elif backend == "torch":
            self.method = "torch.cuda.max_memory_allocated growth"
            self.resettable = True
        elif backend == "tensorflow":
            self.method = "tf get_memory_info('GPU:0')['peak'] growth"
            self.resettable = True
        else:
            self.method = "jax memory_stats()['peak_bytes_in_use'] growth"
            self.resettable = False

    def start(self):
        """Resets the peak (where possible) and records the baseline."""
        if self.resettable:
            self._reset_peak()
        self._baseline = self._current_bytes()

    def peak_growth_bytes(self):
        """Peak bytes in use since `start`, minus the baseline."""
        return max(self._peak_bytes() - self._baseline, 0)

    def _reset_peak(self):
        if self.on_cpu:
            _reset_peak_rss()
        elif self.backend == "torch":
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self.backend == "tensorflow":
            import tensorflow as tf

            tf.config.experimental.reset_memory_stats("GPU:0")

    def _current_bytes(self):
        if self.on_cpu:
            return _proc_status_bytes("VmRSS")
        if self.backend == "torch":
            import torch

            return torch.cuda.memory_allocated()
        if self.backend == "tensorflow":
            import tensorflow as tf

            return tf.config.experimental.get_memory_info("GPU:0")["current"]
        return _jax_memory_stats()["bytes_in_use"]

    def _peak_bytes(self):
        if self.on_cpu:
            return _proc_status_bytes("VmHWM")
        if self.backend == "torch":
            import torch

            return torch.cuda.max_memory_allocated()
        if self.backend == "tensorflow":
            import tensorflow as tf

            return tf.config.experimental.get_memory_info("GPU:0")["peak"]
        return _jax_memory_stats()["peak_bytes_in_use"]


# glibc serves allocations above this many bytes with their own mmap and
# unmaps them on free, so the RSS follows the live memory. Setting it also
# turns off glibc's dynamic threshold, which would otherwise keep freed
# buffers of up to 32 MiB in the heap.
CPU_MEMORY_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _proc_status_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} is not in /proc/self/status")


def _reset_peak_rss():
    # Writing "5" resets the high-water mark to the current RSS (Linux 4.0+).
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _can_reset_peak_rss():
    try:
        _reset_peak_rss()
        _proc_status_bytes("VmHWM")
    except (OSError, RuntimeError):
        return False
    return True


def _jax_memory_stats():
    import jax

    return jax.devices()[0].memory_stats() or {}
