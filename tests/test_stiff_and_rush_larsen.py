"""Rodas4 (stiff) and Rush–Larsen against outside references.

Robertson's chemical kinetics (rate constants 0.04, 1e4, 3e7) is the standard stiff test problem
(Hairer & Wanner II, §IV.1): explicit methods need ~10^5+ steps on t ≤ 40; an L-stable Rosenbrock
method needs a few hundred. Reference: SciPy Radau at rtol 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from kernels.compile import ode_kernel
from kernels.ode.integrate_numpy import Events, SolverOptions
from kernels.ode.model import Model, Output, Parameter, State

ROBER = Model(
    name="robertson", description="Robertson (1966) stiff chemical kinetics", time_unit="s",
    states=[State("y1", 1.0), State("y2", 0.0), State("y3", 0.0)],
    parameters=[Parameter("k1", 0.04), Parameter("k2", 3e7), Parameter("k3", 1e4)],
    derivatives={"y1": "-k1 * y1 + k3 * y2 * y3", "y2": "k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2", "y3": "k2 * y2 * y2"},
    outputs=[Output("mass", "y1 + y2 + y3")],
)

# A Hodgkin–Huxley-style gate driven by a clamped voltage: x' = (x_inf(V) - x) / tau(V) with V fixed
# per patient. Rush–Larsen is exact for it at any step size.
GATE = Model(
    name="gate", description="voltage-clamped gate", time_unit="ms",
    states=[State("x", 0.0), State("w", 0.0)],
    parameters=[Parameter("V", -20.0, positive=False), Parameter("tau", 2.0)],
    expressions=[("x_inf", "1 / (1 + exp(-(V + 40) / 7))")],
    derivatives={"x": "(x_inf - x) / tau", "w": "x - w * w"},  # w is not a gate (quadratic): Euler
    outputs=[],
)


def _rober_ref(t):
    f = lambda _t, y: [-0.04 * y[0] + 1e4 * y[1] * y[2], 0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2,  # noqa: E731
                       3e7 * y[1] ** 2]
    jac = lambda _t, y: [[-0.04, 1e4 * y[2], 1e4 * y[1]], [0.04, -1e4 * y[2] - 6e7 * y[1], -1e4 * y[1]],  # noqa: E731
                         [0, 6e7 * y[1], 0]]
    return solve_ivp(f, (0, t[-1]), [1, 0, 0], method="Radau", rtol=1e-12, atol=1e-16, t_eval=t, jac=jac).y


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_rodas4_solves_robertson(backend):
    t = np.array([0.0, 0.4, 4.0, 40.0])
    P = np.array([[0.04], [3e7], [1e4]])
    out, st = ode_kernel(ROBER, backend).run(P, Events.empty(1), t, SolverOptions(method="rodas4", rtol=1e-8, atol=1e-14,
                                                                                   max_steps=5000),
                                             ["y1", "y2", "y3", "mass"], np.zeros(1, np.int8))
    assert st[0] == 0
    ref = _rober_ref(t)
    # rtol 1e-8 per step accumulates to ~1e-7 over the run; y2 is ~1e-5 and carried by atol-scaled error
    np.testing.assert_allclose(out[:3, 0], ref, rtol=2e-6, atol=1e-12)
    np.testing.assert_allclose(out[3, 0], 1.0, rtol=1e-12)  # the scheme conserves the linear invariant


def test_dopri5_fails_per_patient_on_stiffness_where_rodas4_succeeds():
    t = np.array([0.0, 40.0])
    P = np.array([[0.04, 0.04], [3e7, 3e7], [1e4, 1e4]])
    _, st = ode_kernel(ROBER, "cpu").run(P, Events.empty(2), t, SolverOptions(method="dopri5", rtol=1e-8, atol=1e-14,
                                                                              max_steps=20_000), ["y1"], np.zeros(2, np.int8))
    assert (st == 3).all()  # max_steps: the explicit method is stability-limited
    _, st = ode_kernel(ROBER, "cpu").run(P, Events.empty(2), t, SolverOptions(method="rodas4", rtol=1e-8, atol=1e-14,
                                                                              max_steps=20_000), ["y1"], np.zeros(2, np.int8))
    assert (st == 0).all()


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_rush_larsen_is_exact_for_a_clamped_gate(backend):
    V = np.array([-80.0, -40.0, -20.0, 10.0])
    tau = np.array([0.5, 2.0, 7.0, 30.0])
    P = np.vstack([V, tau])
    t = np.linspace(0, 20, 11)
    dt = 0.5  # far too coarse for Euler at tau = 0.5; exact for Rush-Larsen
    out, st = ode_kernel(GATE, backend).run(P, Events.empty(4), t, SolverOptions(method="rush_larsen", dt=dt), ["x"],
                                            np.zeros(4, np.int8))
    x_inf = 1 / (1 + np.exp(-(V + 40) / 7))
    exact = x_inf[:, None] * (1 - np.exp(-t[None, :] / tau[:, None]))
    np.testing.assert_allclose(out[0], exact, rtol=1e-12, atol=1e-15)


def test_rush_larsen_converges_at_first_order_on_coupled_states():
    P = np.array([[-20.0], [2.0]])
    t = np.array([0.0, 5.0])
    ref = solve_ivp(lambda _t, y: [(1 / (1 + np.exp(-20 / 7)) - y[0]) / 2.0, y[0] - y[1] ** 2], (0, 5), [0, 0],
                    rtol=1e-12, atol=1e-14).y[1, -1]
    errs = []
    for dt in (0.04, 0.02, 0.01, 0.005):
        out, _ = ode_kernel(GATE, "cpu").run(P, Events.empty(1), t, SolverOptions(method="rush_larsen", dt=dt), ["w"],
                                             np.zeros(1, np.int8))
        errs.append(abs(out[0, 0, -1] - ref))
    ratios = np.array(errs[:-1]) / np.array(errs[1:])
    assert np.all((ratios > 1.8) & (ratios < 2.2)), ratios  # first order: error halves with dt


def test_gating_states_are_detected_from_the_declaration():
    from kernels.ode.symbolic import gating

    assert set(gating(GATE)) == {"x"}


def test_per_state_atol_from_a_job(tmp_path):
    """A job can give atol per state; unknown state names are refused by name."""
    from engine.config import load_job
    from engine.errors import JobError
    from engine.parallel import SerialComm
    from engine.runner import run
    from tests.helpers import small_job

    text = small_job(n=8, solver='method = "rodas4"\nrtol = 1e-9\natol = { A_central = 1e-9, default = 1e-12 }')
    (tmp_path / "job.toml").write_text(text)
    assert run(load_job(tmp_path / "job.toml"), tmp_path / "run", SerialComm(), quiet=True) == 0
    (tmp_path / "bad.toml").write_text(text.replace("A_central = 1e-9", "A_centrl = 1e-9"))
    with pytest.raises(JobError, match="solver.atol.A_centrl"):
        load_job(tmp_path / "bad.toml")
