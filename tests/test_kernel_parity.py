"""Every generated kernel agrees across backends; every CUDA source compiles.

Tolerance: both backends run the same discrete method (same tableau, same step control, same
operation order, no FMA). They differ only where libm and NumPy's vectorised exp/pow round the
last bit differently, which can flip one accept/reject decision and so move the result by about
the local error target. At rtol 1e-10 we therefore allow 1e-8 × (|y| + 1e-6·max|y|): a hundred
times the error target, and far below any real disagreement (a wrong term is ≥ 1e-4).
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from engine.config import Arm, Dose
from engine.dosing import build_events
from engine.models import MODELS
from kernels.compile import ode_kernel
from kernels.ode.codegen_c import kernel_source
from kernels.ode.integrate_numpy import Events, SolverOptions
from kernels.ode.model import InfusionTarget

# horizons (model time units) long enough to exercise the dynamics, short enough that chaotic
# models (Lorenz) do not amplify round-off beyond the tolerance
HORIZON = {"lorenz": 1.0, "circ_0d": 1.0}  # circ_0d: one heart beat (beat events are not applied here)
# circ_0d's valves switch resistance by ~10^7 at opening/closing: rounding differences move a
# switch by one step, so the backends agree to the local error target times the valve gain (~1e-7)
TOL = {"circ_0d": 1e-5}
DEFAULT_HORIZON = 24.0
N = 64


def _setup(model, seed=0):
    rng = np.random.default_rng(seed)
    base = np.array([p.default for p in model.parameters], float)
    spread = np.exp(0.15 * rng.standard_normal((len(base), N)))
    P = np.where(base[:, None] != 0, base[:, None] * spread, base[:, None])
    T = HORIZON.get(model.name, DEFAULT_HORIZON)
    times = np.linspace(0, T, 25)
    if model.doses:
        arms = [Arm(name=r, doses=[Dose(amount=100.0, route=r, interval=T / 4, count=3,
                                        duration=T / 16 if isinstance(t, InfusionTarget) else None)])
                for r, t in model.doses.items()]
        arm_idx = rng.integers(0, len(arms), N).astype(np.int16)
        events = build_events(model, arms, arm_idx, P)
    else:
        events = Events.empty(N)
    return P, events, times


def _record(model):
    return model.output_names + model.state_names


@pytest.mark.parametrize("method", ["dopri5", "rk4", "rodas4", "rush_larsen"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cpu_matches_numpy(name, method):
    model = MODELS[name]
    P, events, times = _setup(model)
    dt = float(times[1] - times[0]) / 64
    opts = SolverOptions(method=method, rtol=1e-10, atol=1e-12, dt=dt, max_steps=200_000)
    rec = _record(model)
    st0 = np.zeros(N, np.int8)
    a, sa = ode_kernel(model, "numpy").run(P, events, times, opts, rec, st0)
    b, sb = ode_kernel(model, "cpu").run(P, events, times, opts, rec, st0)
    np.testing.assert_array_equal(sa, sb)
    ok = sa == 0
    assert ok.mean() > 0.9, f"{name}: most random patients should integrate ({np.bincount(sa)})"
    scale = np.nanmax(np.abs(a[:, ok]), axis=(1, 2), keepdims=True)
    err = np.abs(a[:, ok] - b[:, ok]) / (np.abs(a[:, ok]) + 1e-6 * scale + 1e-300)
    assert np.nanmax(err) <= TOL.get(name, 1e-8), f"{name}/{method}: max scaled difference {np.nanmax(err):.2e}"
    assert np.isnan(b[:, ~ok]).all()


def test_failures_are_per_patient_and_identical():
    """NaN parameters and a step budget fail single patients the same way on both backends."""
    model = MODELS["pk_2cmt"]
    P, events, times = _setup(model, seed=3)
    P[0, 5] = np.nan  # CL → NaN: nonfinite
    P[0, 9] = 1e9  # very stiff elimination: exhausts the step budget
    opts = SolverOptions(rtol=1e-8, atol=1e-10, max_steps=3000)
    outs = {b: ode_kernel(model, b).run(P, events, times, opts, ["C"], np.zeros(N, np.int8)) for b in ("numpy", "cpu")}
    (a, sa), (b, sb) = outs["numpy"], outs["cpu"]
    np.testing.assert_array_equal(sa, sb)
    assert sa[5] == 1 and sa[9] == 3
    assert (sa[[i for i in range(N) if i not in (5, 9)]] == 0).all()
    assert np.isnan(b[:, [5, 9]]).all() and np.isfinite(b[:, sa == 0]).all()


def test_incoming_failed_status_is_not_integrated():
    model = MODELS["pk_1cmt"]
    P, events, times = _setup(model)
    st = np.zeros(N, np.int8)
    st[[1, 2]] = 4
    for b in ("numpy", "cpu"):
        out, s = ode_kernel(model, b).run(P, events, times, SolverOptions(), ["C"], st)
        assert (s[[1, 2]] == 4).all() and np.isnan(out[:, [1, 2]]).all() and np.isfinite(out[:, 0]).all()


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_source_compiles_to_ptx(name, tmp_path):
    """GPU code cannot silently rot: every model's CUDA kernel compiles for Hopper (sm_90)."""
    src = tmp_path / f"{name}.cu"
    src.write_text(kernel_source(MODELS[name]))
    r = subprocess.run([NVCC, "-ptx", "-arch=sm_90", "--std=c++14", "-o", str(tmp_path / f"{name}.ptx"), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ptx = (tmp_path / f"{name}.ptx").read_text()
    assert ".entry twin_run_cuda" in ptx


def _nvrtc():
    try:
        import ctypes
        import glob
        import os

        import nvidia.cuda_nvrtc as pkg

        libs = glob.glob(os.path.join(list(pkg.__path__)[0], "lib", "libnvrtc.so*"))
        return ctypes.CDLL(libs[0]) if libs else None
    except (ImportError, OSError):
        return None


NVRTC = _nvrtc()


@pytest.mark.skipif(NVRTC is None, reason="NVRTC (nvidia-cuda-nvrtc) not installed")
@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_source_compiles_with_nvrtc(name, precision):
    """The exact compiler and options CuPy's RawModule uses on a GPU machine."""
    import ctypes

    src = kernel_source(MODELS[name], precision).encode()
    prog = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), src, f"{name}.cu".encode(), 0, None, None) == 0
    opts = (ctypes.c_char_p * 2)(b"--std=c++14", b"-arch=compute_90")
    rc = NVRTC.nvrtcCompileProgram(prog, 2, opts)
    n = ctypes.c_size_t()
    NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    NVRTC.nvrtcGetProgramLog(prog, log)
    NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, log.value.decode()


def _gpu():
    try:
        import cupy as cp

        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _gpu(), reason="no CUDA device (CuPy) on this machine")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_matches_numpy(name):
    model = MODELS[name]
    P, events, times = _setup(model)
    opts = SolverOptions(rtol=1e-10, atol=1e-12, max_steps=200_000)
    rec = _record(model)
    a, sa = ode_kernel(model, "numpy").run(P, events, times, opts, rec, np.zeros(N, np.int8))
    b, sb = ode_kernel(model, "cuda").run(P, events, times, opts, rec, np.zeros(N, np.int8))
    np.testing.assert_array_equal(sa, sb)
    ok = sa == 0
    scale = np.nanmax(np.abs(a[:, ok]), axis=(1, 2), keepdims=True)
    err = np.abs(a[:, ok] - b[:, ok]) / (np.abs(a[:, ok]) + 1e-6 * scale + 1e-300)
    assert np.nanmax(err) <= 1e-8
