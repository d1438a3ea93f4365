"""Membrane-potential lookup tables of the tissue cell step (kernels/tissue/tables.py) and the
vectorisable exp/expm1/log they use (kernels/tissue/simd_math.c).

The references are the exact cell step (same kernels with tables off, which
tests/test_tissue.py checks against the NumPy backend and an adaptive stiff solver) and libm /
extended-precision NumPy for the math functions."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from engine.tissue.geometry import Geometry, box_region, uniform_fibres
from engine.tissue.simulate import simulate
from engine.tissue.solver import Stimulus, TissueSolver
from kernels.compile import build_shared_library
from kernels.ode.model import Input, Model, State
from kernels.tissue import build as tb
from kernels.tissue.tables import DV, V_LO, build_table, plan_tables

ROOT = Path(__file__).resolve().parents[1]
TP06 = ROOT / "tests" / "data" / "cardiac" / "ten_tusscher_model_2006_epi.cellml"
AMP = -35.714  # A/F, the stimulus of tests/test_tissue.py


@pytest.fixture(scope="module")
def tp06():
    from kernels.ode.cellml import import_cellml

    m = import_cellml(TP06)
    return m, np.array([q.default for q in m.parameters])


def _slab(shape=(9, 4, 3), dx=0.25):
    g = Geometry(np.ones(shape, bool), uniform_fibres(shape, (1.0, 0.0, 0.0)), dx, 0.0953, 0.0126)
    st = [Stimulus(box_region(shape, dx, [0, 0, 0], [0.5, 0.5, 0.5]), 0.0, 2.0, AMP)]
    return g, st


# ------------------------------------------------------------------------------- vector math
_HARNESS = """
#include <math.h>
#include <stdint.h>
#define TWIN_INF (INFINITY)
#define TWIN_NAN (NAN)
@@MATH@@
void v_exp(long n, const double* x, double* y) {
#pragma omp simd
    for (long i = 0; i < n; ++i) y[i] = twin_v_exp(x[i]);
}
void v_expm1(long n, const double* x, double* y) {
#pragma omp simd
    for (long i = 0; i < n; ++i) y[i] = twin_v_expm1(x[i]);
}
void v_log(long n, const double* x, double* y) {
#pragma omp simd
    for (long i = 0; i < n; ++i) y[i] = twin_v_log(x[i]);
}
"""


@pytest.fixture(scope="module")
def vmath():
    src = _HARNESS.replace("@@MATH@@", tb.SIMD_MATH.read_text())
    lib = ctypes.CDLL(str(build_shared_library(src, "twin_simd_math_test", tb.TISSUE_CFLAGS)))
    D = ctypes.POINTER(ctypes.c_double)

    def call(name, x):
        x = np.ascontiguousarray(x, float)
        y = np.empty_like(x)
        getattr(lib, name)(ctypes.c_long(x.size), x.ctypes.data_as(D), y.ctypes.data_as(D))
        return y

    return call


def _ulps(got: np.ndarray, ref: np.ndarray) -> float:
    """Error in units of the last place of the double nearest the extended-precision reference."""
    r = ref.astype(float)
    return float(np.max(np.abs(got.astype(np.longdouble) - ref) / np.spacing(np.abs(r))))


def test_vector_exp_expm1_log_are_within_two_ulp_of_the_exact_values(vmath):
    """Against NumPy in x86 extended precision (64-bit mantissa, ~2000x finer than a double ulp):
    exp and log within 2 ulp (measured 1), expm1 within 5 ulp (measured 4: beyond |x| = ln2/2 it is
    exp(x) - 1, whose subtraction costs up to two bits near x = -ln2/2), over the whole normal
    range and densely around 0 and 1 where cancellation would show."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(-708, 709, 100_000), rng.uniform(-1, 1, 50_000), rng.uniform(-1e-6, 1e-6, 5_000)])
    xl = np.longdouble(x)
    assert _ulps(vmath("v_exp", x), np.exp(xl)) <= 2
    assert _ulps(vmath("v_expm1", x), np.expm1(xl)) <= 5
    pos = np.concatenate([np.exp(rng.uniform(-700, 700, 100_000)), rng.uniform(0.5, 2.0, 50_000),
                          1 + rng.uniform(-1e-9, 1e-9, 5_000), [5e-324, 1e-310]])
    got, ref = vmath("v_log", pos), np.log(np.longdouble(pos))
    far = np.abs(ref) > 1e-3  # near log(1) = 0 the error is absolute: bounded by 2 ulp of the argument
    assert _ulps(got[far], ref[far]) <= 2
    assert np.max(np.abs(got[~far] - ref[~far].astype(float))) <= 2 * np.spacing(2.0)


def test_vector_math_special_values(vmath):
    inf, nan = np.inf, np.nan
    e = vmath("v_exp", [inf, -inf, nan, 710.0, -746.0, 0.0, -708.5])
    assert e[0] == inf and e[1] == 0 and np.isnan(e[2]) and e[3] == inf and e[4] == 0 and e[5] == 1.0
    assert e[6] == 0.0  # below DBL_MIN: flushed to zero (documented in simd_math.c)
    lg = vmath("v_log", [0.0, -1.0, inf, nan, 1.0, 5e-324])
    assert lg[0] == -inf and np.isnan(lg[1]) and lg[2] == inf and np.isnan(lg[3]) and lg[4] == 0.0
    assert lg[5] == pytest.approx(np.log(5e-324), rel=1e-15)  # subnormal input
    m = vmath("v_expm1", [1e-300, -1e-20, 0.0, 800.0, -inf])
    assert m[0] == 1e-300 and m[1] == -1e-20 and m[2] == 0.0 and m[3] == inf and m[4] == -1.0


# ------------------------------------------------------------------------------- the plan
def test_tp06_plan_tabulates_every_voltage_gate_and_leaves_only_concentration_terms(tp06):
    """The 11 gates whose rates depend on V alone go through (E, G) columns; fCass (Ca_ss) and the
    RyR state R' (Ca_ss, Ca_SR) do not. What is left per voxel calls exp only in I_K1 (V - E_K,
    and E_K depends on K_i) and log only for the four reversal potentials; no pow call remains."""
    m, _ = tp06
    plan = plan_tables(m, "membrane_V")
    gates = {g.split("_")[-1] for g in plan.gates}
    assert gates == {"Xr1", "Xr2", "Xs", "m", "h", "j", "d", "f", "f2", "s", "r"}
    src = tb.tissue_source(m)
    lut = src[src.index("DEVICE void model_rl_step_lut"):]
    lut = lut[:lut.index("\n}\n")]
    assert lut.count("r_exp(") == 4 and lut.count("r_log(") == 4 and "r_pow(" not in lut
    exps = [ln for ln in lut.splitlines() if "r_exp(" in ln]
    assert all("inward_rectifier" in ln for ln in exps)
    assert "#define TISSUE_LUT_SIMD 1" in src  # nothing in TP06 keeps the table step from vectorising


def _hh_model() -> Model:
    """One Hodgkin-Huxley style gate with the removable singularity V/(1 - exp(-V/10)) at V = 0,
    which falls exactly on a table node (-150 + 15000 x 0.01 = 0)."""
    a = "0.1 * V / (1 - exp(-V / 10))"
    b = "4 * exp(-V / 18)"
    return Model(name="hh_gate", description="singular rate", time_unit="ms",
                 states=[State("V", -65.0, "mV"), State("g", 0.05, "1")], parameters=[],
                 derivatives={"V": "-i_stim_amp", "g": f"({a}) * (1 - g) - ({b}) * g"}, outputs=[],
                 inputs=[Input("i_stim_amp")])


def test_removable_singularity_on_a_table_node_is_repaired():
    m = _hh_model()
    plan = plan_tables(m, "V")
    assert list(plan.gates) == ["g"]
    T, v0, idv = build_table(plan, np.zeros(0), 0.01)
    assert np.isfinite(T).all()
    k = int(round((0.0 - v0) * idv))
    assert v0 + k / idv == 0.0
    # at V = 0: alpha = 1 (the limit), beta = 4: E = exp(-5 dt), G = alpha (1 - E) / 5
    E = np.exp(-5 * 0.01)
    e_col, g_col = plan.order.index(("E", "g")), plan.order.index(("G", "g"))
    # the repaired row is the mean of its neighbours: O(dv^2) = 1e-4 mV^2 x the curvature; measured
    # 7e-9 (E) and 1e-7 (G) relative
    assert T[k, e_col] == pytest.approx(E, rel=1e-6)
    assert T[k, g_col] == pytest.approx((1 - E) / 5, rel=1e-6)


# ------------------------------------------------------------------------------- the table step
def _one_step(tp06, kernels, Y0, s, amp=AMP):
    Y = Y0.copy()
    Vs = np.zeros_like(s.Vs)
    kernels.cell(s.mask, Y, Vs, s.p, s.stim_id, np.array([amp]), s.t, s.dt, s.vidx)
    Y[s.vidx] = Vs
    return Y


@pytest.fixture(scope="module")
def upstroke_state(tp06):
    """A slab 1.2 ms into a corner stimulus: voxels at rest, mid-upstroke and in the plateau."""
    m, p = tp06
    g, st = _slab()
    s = TissueSolver(g, m, p, tb.tissue_kernels(m, "cpu"), st, 0.02)
    for _ in range(60):
        s.step()
    return s, s.Y.copy()


def _rel_err(a, b, y0, mask):
    """max over states of max |a - b| / max |a - y0| (the error relative to the step's change)."""
    return max(float(np.max(np.abs(a[i][mask] - b[i][mask])) / max(np.max(np.abs(a[i][mask] - y0[i][mask])), 1e-300))
               for i in range(a.shape[0]))


def test_table_step_equals_the_exact_step_on_table_nodes(tp06, upstroke_state):
    """With every V on a table node the interpolation weight is 0 and the table step reproduces the
    exact step up to round-off (the update is written y E + G instead of y + dt f phi, and divisions
    by parameters become products): measured 3e-12 of the step's change; bound 1e-10."""
    m, _ = tp06
    s, Y0 = upstroke_state
    Y0 = Y0.copy()
    Y0[s.vidx] = V_LO + DV * np.round((Y0[s.vidx] - V_LO) / DV)
    mask = s.mask.astype(bool)
    exact = _one_step(tp06, tb.tissue_kernels(m, "cpu"), Y0, s)
    tab = _one_step(tp06, tb.tissue_kernels(m, "cpu", tables=True), Y0, s)
    assert _rel_err(exact, tab, Y0, mask) < 1e-10


def test_table_step_between_nodes_is_within_the_interpolation_bound(tp06, upstroke_state):
    """Off the nodes the error is linear interpolation's |f''| dv^2 / 8: for TP06's steepest gate
    function (m_inf, scale ~9 mV) (0.01/9)^2/8 = 1.5e-7 of the change; measured 1.5e-7, bound 1e-6."""
    m, _ = tp06
    s, Y0 = upstroke_state
    mask = s.mask.astype(bool)
    exact = _one_step(tp06, tb.tissue_kernels(m, "cpu"), Y0, s)
    tab = _one_step(tp06, tb.tissue_kernels(m, "cpu", tables=True), Y0, s)
    err = _rel_err(exact, tab, Y0, mask)
    assert 1e-9 < err < 1e-6  # the lower bound: the interpolation really happens


def test_scalar_table_step_of_the_cuda_kernel_equals_the_vectorised_one(tp06, upstroke_state, monkeypatch):
    """The CUDA kernel runs the scalar `model_rl_step_lut` (one thread per voxel); the C backend
    runs the vectorised loop. Built on the CPU without the vectorised loop, the scalar version
    agrees with it to 5e-11 of the change: libm vs simd_math.c exp/log (an ulp or two) and the
    fused multiply-adds of the vectorised loop, whose few-ulp rounding differences show up relative
    to the small changes of the slow states (measured 8.3e-12; 1e-12 before fused multiply-adds)."""
    m, _ = tp06
    s, Y0 = upstroke_state
    mask = s.mask.astype(bool)
    simd = _one_step(tp06, tb.tissue_kernels(m, "cpu", tables=True), Y0, s)
    monkeypatch.setattr(tb, "lut_simd_source", lambda plan: "#define TISSUE_LUT_SIMD 0\n#define TISSUE_LUT_VIDX (-1)\n")
    monkeypatch.setattr(tb, "_CACHE", {})
    scalar = _one_step(tp06, tb.tissue_kernels(m, "cpu", tables=True), Y0, s)
    assert "TISSUE_LUT_SIMD 0" in tb.tissue_source(m)
    assert _rel_err(simd, scalar, Y0, mask) < 5e-11


def test_voxels_outside_the_table_take_the_exact_step(tp06, upstroke_state):
    """V above the table (+200 mV), below it (-200 mV) and NaN: those voxels get the exact step bit
    for bit (the same compiled function), the others the table step."""
    m, _ = tp06
    s, Y0 = upstroke_state
    Y0 = Y0.copy()
    out = np.flatnonzero(s.mask)[[3, 50, 77]]
    Y0[s.vidx][out] = [200.0, -200.0, np.nan]
    exact = _one_step(tp06, tb.tissue_kernels(m, "cpu"), Y0, s)
    tab = _one_step(tp06, tb.tissue_kernels(m, "cpu", tables=True), Y0, s)
    np.testing.assert_array_equal(tab[:, out], exact[:, out])
    keep = s.mask.astype(bool).copy()
    keep[out] = False
    assert _rel_err(exact, tab, Y0, keep) < 1e-6


def test_tables_move_activation_times_by_less_than_a_microsecond(tp06):
    """A 4 x 1.5 x 1 mm TP06 slab, 15 ms: activation times with and without tables differ by < 1e-3
    ms everywhere (measured 2e-5 ms here and 3e-5 ms on the Niederer dx 0.5 mm slab), far below
    the 0.02 ms time step and the 0.6 ms spread between the benchmark's codes."""
    m, p = tp06
    shape = (17, 7, 5)
    g, st = _slab(shape)
    r = [simulate(g, m, p, tb.tissue_kernels(m, "cpu", tables=t), st, 0.02, 15.0) for t in (False, True)]
    a0, a1 = r[0].maps.activation, r[1].maps.activation
    assert np.isfinite(a0).all() and np.isfinite(a1).all()
    assert np.max(np.abs(a0 - a1)) < 1e-3


def test_lookup_tables_key_is_validated(tmp_path):
    from engine.config import load_job
    from engine.errors import JobError

    bench = (ROOT / "jobs" / "niederer_benchmark.toml").read_text()
    p = tmp_path / "j.toml"
    p.write_text(bench.replace("end_time = 200.0", 'end_time = 200.0\nlookup_tables = "yes"'))
    with pytest.raises(JobError) as e:
        load_job(p)
    assert "tissue.lookup_tables" in str(e.value)
    p.write_text(bench.replace("end_time = 200.0", "end_time = 200.0\nlookup_tables = false"))
    assert load_job(p).job.tissue.lookup_tables is False
