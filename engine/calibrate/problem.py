"""From imported observations (engine.observations) to a batched `FitProblem` for a chunk.

Times: the kernels sample every patient of a chunk at one time grid, so the grid is the union of
the chunk's observation times; each patient's y is NaN where it has no observation.
"""

from __future__ import annotations

import numpy as np

from kernels.ode.integrate_numpy import EVENT_INPUT, EVENT_STATE, Events, SolverOptions
from kernels.ode.model import BolusTarget, Model

from ..observations import PatientRecords
from .map_fit import FitProblem


def dose_events(model: Model, route: str | None, doses: list[list[tuple[float, float]]], P: np.ndarray,
                infusion_duration: float | None = None) -> tuple[Events, np.ndarray]:
    """Per-patient dose lists [(time, amount)] as kernel events, plus the fraction index per event."""
    m = len(doses)
    if route is None or not any(doses):
        return Events.empty(m), np.zeros((0, m), np.int64)
    tgt = model.doses[route]
    pn = model.parameter_names
    frac = pn.index(tgt.fraction) if tgt.fraction else -1
    per = []
    for d in doses:
        ev = []
        for t, a in d:
            if isinstance(tgt, BolusTarget):
                ev.append((t, EVENT_STATE, model.state_names.index(tgt.state), a))
            else:
                dur = infusion_duration or 1.0
                i = model.input_names.index(tgt.input)
                ev += [(t, EVENT_INPUT, i, a / dur), (t + dur, EVENT_INPUT, i, -a / dur)]
        per.append(sorted(ev, key=lambda e: e[0]))
    n = max(len(e) for e in per)
    tt = np.full((n, m), np.inf)
    kk = np.zeros((n, m), np.int8)
    gg = np.zeros((n, m), np.int16)
    vv = np.zeros((n, m))
    ff = np.full((n, m), -1, np.int64)
    for j, evs in enumerate(per):
        for i, (t, k, g, v) in enumerate(evs):
            tt[i, j], kk[i, j], gg[i, j], vv[i, j] = t, k, g, v
            if frac >= 0:
                vv[i, j] *= P[frac, j]
                ff[i, j] = frac
    return Events(tt, kk, gg, vv), ff


def input_events(model: Model, patients: list[PatientRecords], spec: dict) -> Events:
    """Imported input rows as kernel events: `amount` rows switch the input on at `rate` for
    amount/rate, `rate` rows step the input to a new level (events add the change)."""
    m = len(patients)
    per = [[] for _ in range(m)]
    for name, s in spec.items():
        g = model.input_names.index(name)
        for j, p in enumerate(patients):
            level = 0.0
            for t, v in p.inputs.get(name, []):
                if s.kind == "amount":
                    if v > 0:
                        per[j] += [(t, g, s.rate), (t + v / s.rate, g, -s.rate)]
                else:
                    per[j].append((t, g, v - level))
                    level = v
    n = max((len(e) for e in per), default=0)
    tt = np.full((n, m), np.inf)
    gg = np.zeros((n, m), np.int16)
    vv = np.zeros((n, m))
    for j, evs in enumerate(per):
        for i, (t, g, v) in enumerate(sorted(evs, key=lambda e: e[0])):
            tt[i, j], gg[i, j], vv[i, j] = t, g, v
    return Events(tt, np.full((n, m), EVENT_INPUT, np.int8), gg, vv)


def merge(a: Events, fa: np.ndarray, b: Events) -> tuple[Events, np.ndarray]:
    """Events a (with fraction indices fa) and b (no fractions), per patient in time order."""
    if b.time.shape[0] == 0:
        return a, fa
    tt = np.concatenate([a.time, b.time])
    ff = np.concatenate([fa, np.full(b.time.shape, -1, np.int64)])
    order = np.argsort(tt, axis=0, kind="stable")
    take = lambda x: np.ascontiguousarray(np.take_along_axis(x, order, axis=0))  # noqa: E731
    return Events(take(tt), take(np.concatenate([a.kind, b.kind])), take(np.concatenate([a.target, b.target])),
                  take(np.concatenate([a.value, b.value]))), take(ff)


def observation_grid(patients: list[PatientRecords], outputs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Union time grid [T] and y [n_out, m, T] (NaN where a patient has no observation)."""
    ts = [t for p in patients for o in outputs if o in p.obs for t in p.obs[o][0]]
    grid = np.unique(np.asarray(ts, float)) if ts else np.array([0.0])
    y = np.full((len(outputs), len(patients), len(grid)), np.nan)
    for j, p in enumerate(patients):
        for i, o in enumerate(outputs):
            if o in p.obs:
                t, v = p.obs[o]
                y[i, j, np.searchsorted(grid, t)] = v
    return grid, y


def build_problem(model: Model, patients: list[PatientRecords], params: list[str], outputs: list[str],
                  fixed: dict[str, float], mu: np.ndarray, omega: np.ndarray, err_add, err_prop,
                  route: str | None, backend: str, opts: SolverOptions | None = None,
                  inputs: dict | None = None, infusion_duration: float | None = None) -> FitProblem:
    m = len(patients)
    typical = {**model.defaults(), **fixed}
    P = np.array([[typical[n]] * m for n in model.parameter_names], float).reshape(len(model.parameters), m)
    for j, p in enumerate(params):
        P[model.parameter_names.index(p)] = np.exp(np.broadcast_to(mu, (m, len(params)))[:, j])
    events, frac = dose_events(model, route, [p.doses for p in patients], P, infusion_duration)
    if inputs:
        events, frac = merge(events, frac, input_events(model, patients, inputs))
    grid, y = observation_grid(patients, outputs)
    return FitProblem(model, list(params), list(outputs), P, events, frac, grid, y, np.asarray(mu, float),
                      np.asarray(omega, float), np.asarray(err_add, float), np.asarray(err_prop, float), backend,
                      opts or SolverOptions(rtol=1e-8, atol=1e-10))
