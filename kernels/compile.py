"""Backend bundles: one kernel object per (model, backend), built once and cached.

- numpy: generated vectorised Python (the reference).
- cpu:   generated C compiled by the system compiler with OpenMP, cached on disk by source hash,
         loaded with ctypes.
- cuda:  the same C source compiled by NVRTC through CuPy's RawModule, one thread per patient.

Only `engine.backend` decides which backend runs; this module builds what it is told to.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from .ode.codegen_c import kernel_source
from .ode.codegen_numpy import generate
from .ode.integrate_numpy import Events, SolverOptions, integrate
from .ode.model import Model

# -ffp-contract=off: no fused multiply-add, so the C kernel rounds like the NumPy reference and
# results do not depend on which machine's compiler contracted what.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=c99"]


class CompileError(RuntimeError):
    pass


@dataclass
class OdeKernel:
    """Runs the whole time loop of a chunk of patients in one call."""

    model: Model
    backend: str
    run: Callable  # run(p, events, times, opts, record, status, check) -> (samples [n_rec, m, T], status)
    source: str


def _record_plan(model: Model, record: list[str]) -> tuple[np.ndarray, np.ndarray]:
    outs, st = model.output_names, model.state_names
    kind = np.array([0 if r in outs else 1 for r in record], np.int32)
    idx = np.array([outs.index(r) if r in outs else st.index(r) for r in record], np.int32)
    return kind, idx


# ---------------------------------------------------------------- numpy
def _numpy_kernel(model: Model) -> OdeKernel:
    gen = generate(model)

    def run(p, events: Events, times, opts: SolverOptions, record: list[str], status, check=None, y0=None, u0=None,
            t0=0.0, final=None):
        kind, idx = _record_plan(model, record)

        def rec(t, y, pp, u):
            o = gen.outputs(t, y, pp, u) if (kind == 0).any() else None
            return np.array([o[i] if k == 0 else y[i] for k, i in zip(kind, idx)])

        start = gen.init(p) if y0 is None else np.asarray(y0, float)
        return integrate(gen.rhs, rec, start, p, len(model.inputs), events, times, opts, status=status,
                         check=check, jac=gen.jac, dfdt=gen.dfdt, rl_b=gen.rl_b, u0=u0, t0=t0, final=final)

    return OdeKernel(model, "numpy", run, gen.source)


# ---------------------------------------------------------------- cpu (C + OpenMP)
def cache_dir() -> Path:
    d = Path(os.environ.get("TWIN_KERNEL_CACHE", Path.home() / ".cache" / "twin-engine" / "kernels"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def c_compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


@lru_cache(maxsize=None)
def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return cc


@lru_cache(maxsize=None)
def _openmp_flag(cc: str) -> list[str]:
    """-fopenmp if the compiler accepts it (probed once), else build single-threaded."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "omp.c"
        src.write_text("#include <omp.h>\nint f(void){return omp_get_max_threads();}\n")
        r = subprocess.run([cc, "-fopenmp", "-fPIC", "-shared", "-o", str(Path(d) / "omp.so"), str(src)],
                           capture_output=True)
        return ["-fopenmp"] if r.returncode == 0 else []


def build_shared_library(source: str, name: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile `source` once per (source, compiler, flags); concurrent ranks share the result.
    `extra_flags` may only add flags that keep IEEE results (e.g. -fno-trapping-math)."""
    cc = c_compiler()
    if cc is None:
        raise CompileError("no C compiler found (set CC)")
    flags = CFLAGS + list(extra_flags) + _openmp_flag(cc)
    # -march=native: the key includes the CPU model so a shared cache never hands one node's
    # binary to an older node
    key = hashlib.sha256("\n".join([source, _compiler_id(cc), " ".join(flags), os.uname().machine,
                                    _cpu_signature()]).encode()).hexdigest()[:24]
    lib = cache_dir() / f"{name}-{key}.so"
    if lib.exists():
        return lib
    with tempfile.TemporaryDirectory(dir=cache_dir()) as d:
        src = Path(d) / f"{name}.c"
        src.write_text(source)
        tmp = Path(d) / "out.so"
        r = subprocess.run([cc, *flags, "-o", str(tmp), str(src), "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            raise CompileError(f"C compile of {name} failed:\n{r.stderr[-4000:]}")
        (cache_dir() / f"{name}-{key}.c").write_text(source)  # kept for reading and debugging
        os.replace(tmp, lib)  # atomic: another rank may have finished first, either copy is fine
    return lib


@lru_cache(maxsize=None)
def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
        return hashlib.sha256("".join(lines).encode()).hexdigest()
    except OSError:
        return "unknown"


def probe_cpu_build() -> None:
    """Build (or find cached) a trivial kernel: proves the compiler and flags work here."""
    from .ode.model import Model, State

    probe = Model(name="probe", description="", time_unit="1", states=[State("x", 1.0)], parameters=[],
                  derivatives={"x": "-x"}, outputs=[])
    ctypes.CDLL(str(build_shared_library(kernel_source(probe), "twin_probe")))


def default_threads() -> int:
    if "OMP_NUM_THREADS" in os.environ:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("MPI_LOCALNRANKS", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE",
                                                                  os.environ.get("SLURM_NTASKS_PER_NODE", "1")) or 1))
    return max(1, n // max(local, 1))


_D = ctypes.POINTER(ctypes.c_double)
_I8 = ctypes.POINTER(ctypes.c_int8)
_I16 = ctypes.POINTER(ctypes.c_int16)
_I32 = ctypes.POINTER(ctypes.c_int32)


def _ptr(a: np.ndarray, t):
    return a.ctypes.data_as(t)


def _solver_args(model: Model, opts: SolverOptions, dtype=np.float64):
    atol = np.ascontiguousarray(np.broadcast_to(np.asarray(opts.atol, float), (len(model.states),)), dtype=dtype)
    method = {"dopri5": 0, "rk4": 1, "rodas4": 2, "rush_larsen": 3}[opts.method]
    first = float(opts.first_step) if opts.first_step else 0.0
    return atol, method, first


def _cpu_kernel(model: Model, precision: str = "float64") -> OdeKernel:
    src = kernel_source(model, precision)
    lib = ctypes.CDLL(str(build_shared_library(src, f"twin_{model.name}_{precision}")))
    f32 = precision == "float32"
    dt_np = np.float32 if f32 else np.float64
    R, RP = (ctypes.c_float, ctypes.POINTER(ctypes.c_float)) if f32 else (ctypes.c_double, _D)
    fn = lib.twin_run
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, RP, ctypes.c_int, RP, _I8, _I16, RP, ctypes.c_int, RP, ctypes.c_int,
                   R, RP, ctypes.c_longlong, R, R, ctypes.c_int, _I32, _I32, RP, _I8, RP, RP, R, RP, RP, ctypes.c_int]
    n_s, n_in = len(model.states), max(len(model.inputs), 1)

    def run(p, events: Events, times, opts: SolverOptions, record: list[str], status, check=None,  # noqa: ARG001
            y0=None, u0=None, t0=0.0, final=None):
        m = p.shape[1]
        P = np.ascontiguousarray(p, dtype=dt_np)
        ev_t = np.ascontiguousarray(events.time, dtype=dt_np)
        ev_k = np.ascontiguousarray(events.kind, dtype=np.int8)
        ev_g = np.ascontiguousarray(events.target, dtype=np.int16)
        ev_v = np.ascontiguousarray(events.value, dtype=dt_np)
        tt = np.ascontiguousarray(times, dtype=dt_np)
        kind, idx = _record_plan(model, record)
        out = np.empty((len(record), m, len(tt)), dtype=dt_np)
        st = np.ascontiguousarray(status, dtype=np.int8).copy()
        atol, method, first = _solver_args(model, opts, dt_np)
        yi = None if y0 is None else np.ascontiguousarray(np.asarray(y0).reshape(n_s, m), dtype=dt_np)
        ui = None if u0 is None else np.ascontiguousarray(np.asarray(u0).reshape(-1, m)[:n_in], dtype=dt_np)
        if ui is not None and ui.shape[0] < n_in:  # a model without inputs still has one padding slot
            ui = np.vstack([ui, np.zeros((n_in - ui.shape[0], m), dt_np)])
        yf = np.full((n_s, m), np.nan, dt_np) if final is not None else None
        uf = np.zeros((n_in, m), dt_np) if final is not None else None
        nul = ctypes.cast(None, RP)
        # ctypes releases the GIL for the call: the dispatcher thread keeps serving other ranks
        fn(m, _ptr(P, RP), ev_t.shape[0], _ptr(ev_t, RP), _ptr(ev_k, _I8), _ptr(ev_g, _I16), _ptr(ev_v, RP),
           len(tt), _ptr(tt, RP), method, float(opts.rtol), _ptr(atol, RP), int(opts.max_steps), float(opts.dt),
           first, len(record), _ptr(kind, _I32), _ptr(idx, _I32), _ptr(out, RP), _ptr(st, _I8),
           nul if yi is None else _ptr(yi, RP), nul if ui is None else _ptr(ui, RP), float(t0),
           nul if yf is None else _ptr(yf, RP), nul if uf is None else _ptr(uf, RP), default_threads())
        if final is not None:
            final["y"] = yf.astype(np.float64)
            final["u"] = uf[: len(model.inputs)].astype(np.float64)
        return out.astype(np.float64, copy=False), st

    return OdeKernel(model, "cpu", run, src)


# ---------------------------------------------------------------- cuda (CuPy RawModule)
def _cuda_kernel(model: Model, precision: str = "float64") -> OdeKernel:
    import cupy as cp

    src = kernel_source(model, precision)
    dt_np = np.float32 if precision == "float32" else np.float64
    mod = cp.RawModule(code=src, options=("--std=c++14",), name_expressions=None)
    fn = mod.get_function("twin_run_cuda")

    n_s, n_in = len(model.states), max(len(model.inputs), 1)

    def run(p, events: Events, times, opts: SolverOptions, record: list[str], status, check=None,  # noqa: ARG001
            y0=None, u0=None, t0=0.0, final=None):
        m = p.shape[1]
        kind, idx = _record_plan(model, record)
        atol, method, first = _solver_args(model, opts, dt_np)
        yi = None if y0 is None else cp.asarray(np.asarray(y0, dt_np).reshape(n_s, m))
        ui = None
        if u0 is not None:
            uu = np.zeros((n_in, m), dt_np)
            uu[: np.asarray(u0).reshape(-1, m).shape[0]] = np.asarray(u0).reshape(-1, m)
            ui = cp.asarray(uu)
        yf = cp.full((n_s, m), np.nan, dtype=dt_np) if final is not None else None
        uf = cp.zeros((n_in, m), dtype=dt_np) if final is not None else None
        T = len(times)
        d = {k: cp.asarray(np.ascontiguousarray(v)) for k, v in dict(
            P=np.asarray(p, dt_np), ev_t=np.asarray(events.time, dt_np),
            ev_k=np.asarray(events.kind, np.int8), ev_g=np.asarray(events.target, np.int16),
            ev_v=np.asarray(events.value, dt_np), tt=np.asarray(times, dt_np), atol=atol,
            kind=kind, idx=idx, st=np.asarray(status, np.int8)).items()}
        out = cp.empty((len(record), T, m), dtype=dt_np)
        threads = 128
        fn(((m + threads - 1) // threads,), (threads,),
           (np.int32(m), d["P"], np.int32(events.time.shape[0]), d["ev_t"], d["ev_k"], d["ev_g"], d["ev_v"],
            np.int32(T), d["tt"], np.int32(method), dt_np(opts.rtol), d["atol"], np.int64(opts.max_steps),
            dt_np(opts.dt), dt_np(first), np.int32(len(record)), d["kind"], d["idx"], out, d["st"],
            yi if yi is not None else np.uintp(0), ui if ui is not None else np.uintp(0), dt_np(t0),
            yf if yf is not None else np.uintp(0), uf if uf is not None else np.uintp(0)))
        cp.cuda.get_current_stream().synchronize()
        if final is not None:
            final["y"] = cp.asnumpy(yf).astype(np.float64)
            final["u"] = cp.asnumpy(uf)[: len(model.inputs)].astype(np.float64)
        host = cp.asnumpy(out).transpose(0, 2, 1).astype(np.float64)
        return np.ascontiguousarray(host), cp.asnumpy(d["st"])

    return OdeKernel(model, "cuda", run, src)


_BUILDERS = {"numpy": _numpy_kernel, "cpu": _cpu_kernel, "cuda": _cuda_kernel}
_CACHE: dict[tuple, OdeKernel] = {}


def ode_kernel(model: Model, backend: str, precision: str = "float64") -> OdeKernel:
    """precision float32 exists for the compiled backends (the NumPy reference is float64 only).

    A model without states is pure algebra with nothing to integrate: every backend evaluates it
    with the NumPy code."""
    if not model.states:
        backend, precision = "numpy", "float64"
    key = (model.name, backend, precision, id(model))
    if key not in _CACHE:
        if backend not in _BUILDERS:
            raise ValueError(f"no {backend!r} kernel builder for ODE models")
        if precision not in ("float64", "float32"):
            raise ValueError(f"precision {precision!r}: float64 or float32")
        if backend == "numpy":
            if precision != "float64":
                raise ValueError("the numpy reference backend runs in float64 only")
            _CACHE[key] = _numpy_kernel(model)
        else:
            _CACHE[key] = _BUILDERS[backend](model, precision)
    return _CACHE[key]
