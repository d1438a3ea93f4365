"""Turn each arm's dosing regimen into per-patient event arrays for the kernels."""

from __future__ import annotations

import numpy as np

from kernels.ode.integrate_numpy import EVENT_INPUT, EVENT_STATE, Events
from kernels.ode.model import BolusTarget, Model

from .config import Arm


def _arm_events(model: Model, arm: Arm) -> list[tuple[float, int, int, float, int]]:
    """(time, kind, target index, value, fraction-parameter index or -1), sorted by time."""
    pn = model.parameter_names
    ev = []
    for d in arm.doses:
        tgt = model.doses[d.route]
        frac = pn.index(tgt.fraction) if tgt.fraction else -1
        for t in d.times():
            if isinstance(tgt, BolusTarget):
                ev.append((float(t), EVENT_STATE, model.state_names.index(tgt.state), d.amount, frac))
            else:
                i = model.input_names.index(tgt.input)
                rate = d.amount / d.duration
                ev.append((float(t), EVENT_INPUT, i, rate, frac))
                ev.append((float(t) + d.duration, EVENT_INPUT, i, -rate, frac))
    ev.sort(key=lambda e: e[0])  # stable: same-time events keep regimen order
    return ev


def build_events(model: Model, arms: list[Arm], arm_idx: np.ndarray, p: np.ndarray) -> Events:
    """Events [n_events, m] for patients with arm indices `arm_idx` and parameters p [n_par, m]."""
    per_arm = [_arm_events(model, a) for a in arms]
    n = max((len(e) for e in per_arm), default=0)
    m = len(arm_idx)
    a = len(arms)
    tt = np.full((n, a), np.inf)
    kk = np.zeros((n, a), np.int8)
    gg = np.zeros((n, a), np.int16)
    vv = np.zeros((n, a))
    ff = np.full((n, a), -1, np.int64)
    for j, evs in enumerate(per_arm):
        for i, (t, k, g, v, f) in enumerate(evs):
            tt[i, j], kk[i, j], gg[i, j], vv[i, j], ff[i, j] = t, k, g, v, f
    ai = arm_idx.astype(np.int64)
    ev = Events(tt[:, ai], kk[:, ai], gg[:, ai], vv[:, ai].copy())
    fi = ff[:, ai]
    has = fi >= 0
    if has.any():
        cols = np.broadcast_to(np.arange(m), fi.shape)
        ev.value[has] *= p[fi[has], cols[has]]
    return ev


def schedule_events(model: Model, t: np.ndarray, values: dict[str, np.ndarray]) -> Events:
    """Piecewise-constant per-patient input schedules as events.

    t [K] are the times each value starts to hold; values[input] is [K, m]. Inputs start at 0;
    an event is made only where a patient's value changes, so integration stops no more often
    than the inputs actually change.
    """
    names = model.input_names
    t = np.asarray(t, float)
    rows_t, rows_g, rows_v = [], [], []
    for name, v in values.items():
        v = np.asarray(v, float)
        delta = np.diff(v, axis=0, prepend=np.zeros((1, v.shape[1])))
        rows_t.append(np.broadcast_to(t[:, None], v.shape))
        rows_g.append(np.full(v.shape, names.index(name), np.int16))
        rows_v.append(delta)
    tt, gg, vv = np.concatenate(rows_t), np.concatenate(rows_g), np.concatenate(rows_v)
    tt = np.where(vv != 0, tt, np.inf)  # unchanged values make no event
    order = np.argsort(tt, axis=0, kind="stable")  # per patient, by time (input order kept on ties)
    tt, gg, vv = (np.take_along_axis(a, order, axis=0) for a in (tt, gg, vv))
    n = int(np.isfinite(tt).sum(axis=0).max()) if tt.size else 0
    return Events(np.ascontiguousarray(tt[:n]), np.full((n, tt.shape[1]), EVENT_INPUT, np.int8),
                  np.ascontiguousarray(gg[:n]), np.ascontiguousarray(vv[:n]))
