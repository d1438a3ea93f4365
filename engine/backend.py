"""The one place that decides which backend runs a job.

`auto` picks the fastest backend that has kernels for the job's model family and can run here.
Asking for a backend that cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import JobError

# Backends with ODE kernel builders in this build. Compiled `cpu` (C/OpenMP) and `cuda` (CuPy)
# builders are added by the kernel system; until then only the NumPy reference exists.
ODE_BACKENDS = ("numpy",)
ALL_BACKENDS = ("numpy", "cpu", "cuda")


@dataclass(frozen=True)
class Backend:
    name: str
    device: str  # human-readable device, recorded in provenance


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def resolve(requested: str, local_rank: int = 0) -> Backend:
    if requested == "auto":
        for name in ODE_BACKENDS:  # ordered fastest first once compiled backends exist
            return _make(name, local_rank)
    if requested not in ALL_BACKENDS:
        raise JobError(f"key 'job.backend' = {requested!r}: allowed: auto, {', '.join(ALL_BACKENDS)}")
    if requested not in ODE_BACKENDS:
        raise JobError(
            f"key 'job.backend' = {requested!r}: no {requested} kernels in this build of twin-engine; "
            f"available: {', '.join(ODE_BACKENDS)} (or 'auto')"
        )
    return _make(requested, local_rank)


def _make(name: str, local_rank: int) -> Backend:
    if name == "numpy":
        import numpy as np

        return Backend("numpy", f"{_cpu_name()} (NumPy {np.__version__}, 1 thread per rank)")
    raise AssertionError(name)
