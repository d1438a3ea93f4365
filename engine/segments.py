"""Run a chunk segment by segment between a controller's control times.

Conventions (the same as one continuous run):
- Observations handed to the controller at a control time t are the values just before anything
  happens at t (before doses at t and before the controller's own action).
- Job outputs at t are recorded after the doses and controller actions at t (post-dose).
- Each segment [t_k, t_k+1) is one kernel call over the whole chunk, resumed from the previous
  segment's final state and inputs.
"""

from __future__ import annotations

import numpy as np

from kernels.ode.integrate_numpy import Events

from .controllers import Controller


def cut_events(ev: Events, t0: float, t1: float, closed: bool = False) -> Events:
    """Events with time in [t0, t1) ([t0, t1] if closed), per patient, in time order."""
    keep = (ev.time >= t0) & ((ev.time <= t1) if closed else (ev.time < t1))
    if not keep.any():
        return Events.empty(ev.time.shape[1])
    t = np.where(keep, ev.time, np.inf)
    order = np.argsort(t, axis=0, kind="stable")
    n = int(keep.sum(axis=0).max())
    take = lambda a: np.ascontiguousarray(np.take_along_axis(a, order, axis=0)[:n])  # noqa: E731
    return Events(take(t), take(ev.kind), take(ev.target), take(ev.value))


def merge_events(a: Events, b: Events | None) -> Events:
    if b is None or b.time.shape[0] == 0:
        return a
    if a.time.shape[0] == 0:
        return b
    cat = Events(np.vstack([a.time, b.time]), np.vstack([a.kind, b.kind]), np.vstack([a.target, b.target]),
                 np.vstack([a.value, b.value]))
    return cut_events(cat, -np.inf, np.inf, closed=True)


def run_controlled(kernel, ctl: Controller, P: np.ndarray, events: Events, times: np.ndarray, opts,
                   record: list[str], status: np.ndarray, check=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Returns (samples [len(record), m, T], status, signals sampled at `times` {name: [m, T]})."""
    m = P.shape[1]
    T = len(times)
    t_end = float(times[-1])
    ctrl_t = ctl.control_times()
    ctrl_t = ctrl_t[ctrl_t < t_end]
    if len(ctrl_t) == 0 or ctrl_t[0] != 0.0:
        ctrl_t = np.concatenate([[0.0], ctrl_t[ctrl_t > 0]])
    bounds = np.append(ctrl_t, t_end)
    rec = list(record) + [o for o in ctl.observe if o not in record]
    obs_idx = {o: rec.index(o) for o in ctl.observe}
    out = np.full((len(record), m, T), np.nan)
    status = status.astype(np.int8).copy()

    # the state before anything happens at t = 0
    fin: dict = {}
    first, status = kernel.run(P, Events.empty(m), np.array([0.0]), opts, rec, status, check, final=fin)
    y, u = fin["y"], fin["u"]
    obs = {o: first[i][:, 0] for o, i in obs_idx.items()}
    for k in range(len(bounds) - 1):
        t0, t1 = float(bounds[k]), float(bounds[k + 1])
        last = k == len(bounds) - 2
        alive = status == 0
        ctl.act(t0, y, u, obs, alive)
        seg_ev = merge_events(cut_events(events, t0, t1, closed=last), ctl.events(t0, t1))
        sel = (times >= t0) & ((times <= t1) if last else (times < t1))
        ts = np.unique(np.append(times[sel], t1))
        fin = {}
        samples, status = kernel.run(P, seg_ev, ts, opts, rec, status, check, y0=y, u0=u, t0=t0, final=fin)
        y, u = fin["y"], fin["u"]
        # job outputs for the sample times of this segment
        pos = np.searchsorted(ts, times[sel])
        out[:, :, np.nonzero(sel)[0]] = samples[: len(record)][:, :, pos]
        obs = {o: samples[i][:, -1] for o, i in obs_idx.items()}
    ctl.finish(t_end, y, u, obs, status == 0)
    failed = status != 0
    out[:, failed, :] = np.nan
    sig = {}
    held = np.searchsorted(ctrl_t, times, side="right") - 1  # zero-order hold of control-time signals
    for name, v in ctl.signal_values().items():
        sig[name] = np.asarray(v, float)[:, held]
        sig[name][failed] = np.nan
    return out, status, sig
