"""Lorenz and Bergman minimal model declarations against scipy's solve_ivp, through the engine's
NumPy kernel (adaptive Dormand-Prince and fixed-step RK4)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from engine.models import get_model
from kernels.compile import ode_kernel
from kernels.ode.integrate_numpy import Events, SolverOptions


def _params(model, m: int) -> np.ndarray:
    d = model.defaults()
    return np.array([[d[n]] * m for n in model.parameter_names], dtype=float)


def _run(model, p, times, opts, record):
    m = p.shape[1]
    out, status = ode_kernel(model, "numpy").run(p, Events.empty(m), np.asarray(times, float), opts, record,
                                                 np.zeros(m, np.int8))
    assert (status == 0).all(), status
    return out


def _lorenz_reference(p, t_end, t_eval):
    sigma, rho, beta, x0, y0, z0 = p

    def f(t, v):
        x, y, z = v
        return [sigma * (y - x), x * (rho - z) - y, x * y - beta * z]

    sol = solve_ivp(f, (0.0, t_end), [x0, y0, z0], method="DOP853", rtol=1e-12, atol=1e-12, t_eval=t_eval)
    assert sol.success
    return sol.y


def test_lorenz_declaration():
    model = get_model("lorenz")
    assert model.state_names == ["X", "Y", "Z"]
    d = model.defaults()
    assert (d["sigma"], d["rho"], d["beta"]) == (10.0, 28.0, 8.0 / 3.0)
    assert (d["X0"], d["Y0"], d["Z0"]) == (1.0, 0.0, 0.0)


def test_lorenz_ensemble_dopri5_matches_dop853():
    """50 members, initial conditions perturbed by N(0, 1) and rho in [27, 29], t in [0, 1].

    Tolerance: the engine runs at rtol 1e-10 and takes O(100) steps per member to t = 1; local
    errors are amplified at most by the flow's growth over the horizon (largest Lyapunov exponent
    about 0.9, so about e^0.9 = 2.5 on average along the way at t = 1), giving a global error
    bound of order 1e-10 x 100 x 2.5 = 2.5e-8 relative. We assert 1e-8 relative to |state| at every
    sample (measured: about 1e-10); the DOP853 reference at rtol = atol = 1e-12 is 100x closer.
    Over a long horizon the same check would fail for any tolerance: errors grow like e^(0.9 t).
    """
    model = get_model("lorenz")
    m = 50
    rng = np.random.default_rng(1963)
    p = _params(model, m)
    names = model.parameter_names
    p[names.index("rho")] = 28.0 + rng.uniform(-1.0, 1.0, m)
    for n in ("X0", "Y0", "Z0"):
        p[names.index(n)] += rng.normal(0.0, 1.0, m)
    times = np.linspace(0.1, 1.0, 10)
    out = _run(model, p, times, SolverOptions(rtol=1e-10, atol=1e-12), ["X", "Y", "Z"])  # [3, m, T]
    ref = np.stack([_lorenz_reference(p[:, j], 1.0, times) for j in range(m)], axis=1)
    rel = np.linalg.norm(out - ref, axis=0) / np.linalg.norm(ref, axis=0)
    print(f"\nlorenz dopri5 rtol 1e-10: max relative error {rel.max():.2e} (at t=1: {rel[:, -1].max():.2e})")
    assert rel.max() < 1e-8
    # the output r is the distance from the origin
    r = _run(model, p, [1.0], SolverOptions(rtol=1e-10, atol=1e-12), ["r"])[0, :, 0]
    np.testing.assert_allclose(r, np.linalg.norm(ref[:, :, -1], axis=0), rtol=1e-8)


def test_lorenz_rk4_fourth_order():
    """Fixed-step RK4: halving dt divides the error at t = 1 by about 2^4 = 16.

    Members start on the attractor (points of one long trajectory, rho perturbed). For a single
    member the error vector at t = 1 is C h^4 + O(h^5), and for some members C is small enough
    that the h^5 term still matters at these steps (ratios between 4 and 90 are seen), so the
    test uses the median ratio over the 50 members and the median fitted log-log slope."""
    model = get_model("lorenz")
    m = 50
    rng = np.random.default_rng(4)

    def f(t, v):
        x, y, z = v
        return [10.0 * (y - x), x * (28.0 - z) - y, x * y - 8.0 / 3.0 * z]

    starts = solve_ivp(f, (0.0, 10.0 + m), [1.0, 0.0, 0.0], method="DOP853", rtol=1e-12, atol=1e-12,
                       t_eval=10.0 + np.arange(m)).y
    p = _params(model, m)
    names = model.parameter_names
    p[names.index("rho")] = 28.0 + rng.uniform(-0.5, 0.5, m)
    for i, n in enumerate(("X0", "Y0", "Z0")):
        p[names.index(n)] = starts[i]
    ref = np.stack([_lorenz_reference(p[:, j], 1.0, [1.0])[:, 0] for j in range(m)], axis=1)
    dts = [0.01, 0.005, 0.0025, 0.00125]
    err = np.array([
        np.linalg.norm(_run(model, p, [1.0], SolverOptions(method="rk4", dt=dt), ["X", "Y", "Z"])[:, :, 0] - ref, axis=0)
        for dt in dts
    ])  # [len(dts), m]
    ratios = np.median(err[:-1] / err[1:], axis=1)
    slopes = np.polyfit(np.log(dts), np.log(err), 1)[0]
    print(f"\nlorenz rk4: median error ratios {np.round(ratios, 2)}, median slope {np.median(slopes):.3f}, "
          f"max error at dt={dts[-1]}: {err[-1].max():.1e}")
    assert 14.0 < ratios[-1] < 18.0 and 14.0 < ratios[-2] < 18.0
    assert 3.8 < np.median(slopes) < 4.2


def _bergman_reference(p, times):
    p1, p2, p3, gb, ib, n, gamma, h, g0, i0 = p

    def f(t, v):
        g, x, i = v
        return [-(p1 + x) * g + p1 * gb, -p2 * x + p3 * (i - ib), gamma * max(g - h, 0.0) * t - n * (i - ib)]

    sol = solve_ivp(f, (0.0, times[-1]), [g0, 0.0, i0], method="DOP853", rtol=1e-12, atol=1e-12, t_eval=times)
    assert sol.success
    return sol.y


def test_bergman_declaration():
    model = get_model("bergman_minimal")
    assert model.state_names == ["G", "X", "I"]
    assert {"p1", "p2", "p3", "Gb", "Ib", "n", "gamma", "h"} <= set(model.parameter_names)
    assert model.time_unit == "min"
    assert model.unit_of("G") == "mg/dL" and model.unit_of("I") == "µU/mL" and model.unit_of("p1") == "1/min"
    assert model.reference


def test_bergman_ensemble_matches_solve_ivp():
    """20 subjects with every parameter log-normally perturbed (CV ~30%) around the defaults, a
    3-hour IVGTT sampled every 2 min. Engine rtol 1e-10; assert 1e-7 relative to each state's peak
    magnitude (X starts at 0). Measured: about 3e-10. The secretion term max(G - h, 0) is not smooth
    where G crosses h; both integrators resolve the kink by step-size control."""
    model = get_model("bergman_minimal")
    m = 20
    rng = np.random.default_rng(1981)
    p = _params(model, m) * np.exp(rng.normal(0.0, 0.3, (len(model.parameter_names), m)))
    times = np.arange(0.0, 181.0, 2.0)
    out = _run(model, p, times, SolverOptions(rtol=1e-10, atol=1e-12), ["G", "X", "I"])
    ref = np.stack([_bergman_reference(p[:, j], times) for j in range(m)], axis=1)
    rel = np.abs(out - ref).max(axis=2) / np.abs(ref).max(axis=2)  # [state, member]
    print(f"\nbergman rtol 1e-10: max relative error G {rel[0].max():.1e}, X {rel[1].max():.1e}, I {rel[2].max():.1e}")
    assert rel.max() < 1e-7
    # the kink is reached: some subjects dip below the secretion threshold h
    h = p[model.parameter_names.index("h")]
    assert (ref[0].min(axis=1) < h).any()
    si = _run(model, p[:, :3], [1.0], SolverOptions(rtol=1e-10, atol=1e-12), ["SI"])[0, :, 0]
    np.testing.assert_allclose(si, p[2, :3] / p[1, :3], rtol=1e-14)


@pytest.mark.parametrize("name", ["lorenz", "bergman_minimal"])
def test_defaults_run_clean(name):
    model = get_model(name)
    out = _run(model, _params(model, 2), [0.5, 1.0], SolverOptions(), model.state_names + model.output_names)
    assert np.isfinite(out).all()
