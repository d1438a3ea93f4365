"""The one place that decides which backend runs a job.

`auto` takes `cuda` when CuPy imports and a device is usable, else `cpu` when a C compiler
builds the kernels, else `numpy`. Asking for a backend that cannot run here is an error, never a
silent fallback. Each MPI rank takes GPU `local_rank % n_gpus`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .errors import JobError

ALL_BACKENDS = ("numpy", "cpu", "cuda")


@dataclass(frozen=True)
class Backend:
    name: str
    device: str  # human-readable device, recorded in provenance


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def _cuda_devices() -> tuple[int, str]:
    """(number of usable GPUs, reason if none)."""
    try:
        import cupy as cp

        n = cp.cuda.runtime.getDeviceCount()
        return (n, "") if n > 0 else (0, "CuPy found no CUDA device")
    except ImportError:
        return 0, "CuPy is not installed (pip install 'twin-engine[gpu]')"
    except Exception as e:  # noqa: BLE001 - driver/runtime errors all mean "not usable"
        return 0, f"no usable CUDA device ({e.__class__.__name__}: {e})"


@lru_cache(maxsize=None)
def _cpu_ok() -> tuple[bool, str]:
    from kernels.compile import CompileError, c_compiler, probe_cpu_build

    if c_compiler() is None:
        return False, "no C compiler found (set CC)"
    try:
        probe_cpu_build()
        return True, ""
    except CompileError as e:
        return False, str(e).splitlines()[0]


def available(name: str) -> tuple[bool, str]:
    if name == "numpy":
        return True, ""
    if name == "cpu":
        return _cpu_ok()
    if name == "cuda":
        n, why = _cuda_devices()
        return n > 0, why
    return False, "unknown backend"


def resolve(requested: str, local_rank: int = 0) -> Backend:
    if requested == "auto":
        for name in ("cuda", "cpu", "numpy"):
            if available(name)[0]:
                return _make(name, local_rank)
    if requested not in ALL_BACKENDS:
        raise JobError(f"key 'job.backend' = {requested!r}: allowed: auto, {', '.join(ALL_BACKENDS)}")
    ok, why = available(requested)
    if not ok:
        raise JobError(f"key 'job.backend' = {requested!r}: cannot run here: {why}; use 'auto' or another backend")
    return _make(requested, local_rank)


def _make(name: str, local_rank: int) -> Backend:
    if name == "numpy":
        import numpy as np

        return Backend("numpy", f"{cpu_name()} (NumPy {np.__version__}, 1 thread per rank)")
    if name == "cpu":
        from kernels.compile import _compiler_id, c_compiler, default_threads

        return Backend("cpu", f"{cpu_name()} ({default_threads()} OpenMP threads per rank; {_compiler_id(c_compiler())})")
    import cupy as cp

    n, _ = _cuda_devices()
    dev = local_rank % n
    cp.cuda.Device(dev).use()
    props = cp.cuda.runtime.getDeviceProperties(dev)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return Backend("cuda", f"GPU {dev}: {gpu} (CuPy {cp.__version__})")
