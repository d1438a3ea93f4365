"""Segment-wise runs (what controllers use) equal one continuous run when nothing changes."""

import numpy as np
import pytest

from engine.config import Arm, Dose
from engine.dosing import build_events
from engine.models import get_model
from kernels.compile import ode_kernel
from kernels.ode.integrate_numpy import Events, SolverOptions


def _cut(ev: Events, lo: float, hi: float) -> Events:
    keep = (ev.time >= lo) & (ev.time < hi)
    t = np.where(keep, ev.time, np.inf)
    order = np.argsort(t, axis=0, kind="stable")
    take = lambda a: np.take_along_axis(a, order, axis=0)  # noqa: E731
    return Events(take(t), take(ev.kind), take(ev.target), take(ev.value))


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("method", ["dopri5", "rodas4"])
def test_segments_continue_a_run(backend, method):
    m = get_model("pk_2cmt")
    n = 16
    rng = np.random.default_rng(0)
    P = np.array([[p.default for p in m.parameters]] * n).T * np.exp(0.2 * rng.standard_normal((10, n)))
    arms = [Arm(name="a", doses=[Dose(amount=100.0, route="iv_infusion", duration=2.0, interval=12.0, count=4)])]
    ev = build_events(m, arms, np.zeros(n, np.int16), P)
    times = np.arange(0.0, 49.0, 1.0)
    opts = SolverOptions(method=method, rtol=1e-10, atol=1e-12)
    k = ode_kernel(m, backend)
    whole, st = k.run(P, ev, times, opts, ["C"], np.zeros(n, np.int8))
    # three segments; the cuts fall inside an infusion, so the input state must carry over
    parts, y, u, t0 = [], None, None, 0.0
    for lo, hi in ((0.0, 13.0), (13.0, 30.0), (30.0, 48.0)):
        sel = times[(times >= lo) & (times <= hi)]
        fin = {}
        out, st2 = k.run(P, _cut(ev, lo, hi), sel, opts, ["C"], np.zeros(n, np.int8), y0=y, u0=u, t0=t0, final=fin)
        parts.append(out[:, :, 1:] if lo > 0 else out)
        y, u, t0 = fin["y"], fin["u"], hi
        assert (st2 == 0).all()
    seg = np.concatenate(parts, axis=2)
    # restarting the step-size control at each cut changes the steps, not the answer beyond rtol
    np.testing.assert_allclose(seg, whole, rtol=1e-8, atol=1e-12)
    assert u.shape == (1, n)
