"""The size of the BLAS and OpenMP thread pools of a benchmark process."""


def limit_cpu_threads(threads):
    """Limits the BLAS and OpenMP thread pools of this process to `threads`.

    NumPy's OpenBLAS reads `OPENBLAS_NUM_THREADS` only when it is loaded,
    which happens before any suite runs, so the pools are resized at run time
    with `threadpoolctl` when it is installed. On a machine shared with other
    jobs, BLAS threads that wait for busy cores spin, and two OpenBLAS threads
    on two shared cores ran a TensorLy PARAFAC sweep 20 times slower than one.

    Args:
        threads: Threads per pool, or `None` to leave the pools alone.

    Returns:
        A JSON-serialisable description: the limit asked for, whether it was
        applied, and the pools (library, API, threads) after the change.
    """
    description = {"requested": threads, "applied": False, "pools": []}
    try:
        import threadpoolctl
    except ImportError:
        description["note"] = (
            "threadpoolctl is not installed: pools left as loaded; set "
            "OPENBLAS_NUM_THREADS/OMP_NUM_THREADS before starting instead"
        )
        return description
    if threads is not None:
        # Kept alive for the whole process: the limit lasts as long as it.
        global _THREAD_LIMITER
        _THREAD_LIMITER = threadpoolctl.threadpool_limits(limits=int(threads))
        description["applied"] = True
    description["pools"] = [
        {
            "library": pool.get("internal_api"),
            "api": pool.get("user_api"),
            "threads": pool.get("num_threads"),
        }
        for pool in threadpoolctl.threadpool_info()
    ]
    return description


_THREAD_LIMITER = None
