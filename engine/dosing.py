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
