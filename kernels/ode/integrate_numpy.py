"""Per-patient time loop, vectorised over a chunk: the NumPy reference of the kernel-per-trajectory
design. Every patient carries its own time, step size, event pointer and sample pointer; one pass
of the loop attempts one step for every patient still running, so each patient's arithmetic is the
same whatever else is in the chunk.

Events (doses) stop the integrator exactly at their times: the step is clipped to land on the next
event or sample time, the event is applied, and integration restarts from there. At a time that is
both a dose and a sample, the dose is applied first (outputs are post-dose).

Integrators: adaptive Dormand–Prince 5(4) (FSAL, Hairer's error norm and step control, per-patient
rtol/atol) and fixed-step classic RK4 (steps clipped to land on events/samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.layout import STATUS_CODES

# Dormand & Prince (1980) RK5(4)7M tableau.
_C = np.array([0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1])
_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
# error estimate: difference of the 5th- and 4th-order weights
_E = np.array([71 / 57600, 0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40])

EVENT_STATE = 0  # add value to a state (bolus)
EVENT_INPUT = 1  # add value to an input (infusion rate on/off)


@dataclass
class Events:
    """Per-patient event lists, padded with +inf times: arrays of shape [n_events, n_patients]."""

    time: np.ndarray
    kind: np.ndarray
    target: np.ndarray
    value: np.ndarray

    @staticmethod
    def empty(m: int) -> "Events":
        z = np.zeros((0, m))
        return Events(z, z.astype(np.int8), z.astype(np.int16), z)


@dataclass
class SolverOptions:
    method: str = "dopri5"
    rtol: float = 1e-8
    atol: float | np.ndarray = 1e-10
    max_steps: int = 1_000_000
    dt: float = 0.01
    first_step: float | None = None
    check_every: int = 64  # iterations between calls of the interrupt check


def _rms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(x * x, axis=0))


def integrate(
    rhs: Callable,
    record: Callable,
    y0: np.ndarray,
    p: np.ndarray,
    n_inputs: int,
    events: Events,
    times: np.ndarray,
    opts: SolverOptions,
    status: np.ndarray | None = None,
    check: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Integrate every patient from t=0 through all sample `times`.

    rhs(t, y, p, u) -> dy; record(t, y, p, u) -> [n_rec, m] values stored at sample times.
    Returns (samples [n_rec, m, T] with NaN where a patient failed, status int8 [m]).
    Patients whose incoming `status` is non-zero are not integrated.
    """
    n_s, m = y0.shape
    T = len(times)
    status = np.zeros(m, np.int8) if status is None else status.astype(np.int8).copy()
    y = np.array(y0, dtype=float)
    u = np.zeros((n_inputs, m))
    t = np.zeros(m)
    atol = np.broadcast_to(np.asarray(opts.atol, float).reshape(-1, 1) if np.ndim(opts.atol) else opts.atol, (n_s, 1))
    rtol = opts.rtol
    adaptive = opts.method == "dopri5"

    # one padding row so a pointer one past the last event reads +inf
    n_ev = events.time.shape[0]
    ev_t = np.vstack([events.time, np.full((1, m), np.inf)])
    ev_ptr = np.zeros(m, np.int64)
    s_ptr = np.zeros(m, np.int64)
    times_pad = np.append(np.asarray(times, float), np.inf)
    n_rec = None
    out: np.ndarray | None = None

    cols = np.arange(m)
    running = status == 0
    steps = np.zeros(m, np.int64)
    h = np.full(m, np.nan)
    k1 = np.zeros((n_s, m))
    k1_ok = np.zeros(m, bool)

    def boundary(idx: np.ndarray) -> None:
        """Apply due events, then record due samples, for patients `idx` sitting at t[idx]."""
        nonlocal out, n_rec
        while idx.size:
            due = ev_t[ev_ptr[idx], idx] <= t[idx]
            d = idx[due]
            if not d.size:
                break
            e = ev_ptr[d]
            kind, tgt, val = events.kind[e, d], events.target[e, d], events.value[e, d]
            st = kind == EVENT_STATE
            np.add.at(y, (tgt[st], d[st]), val[st])
            np.add.at(u, (tgt[~st], d[~st]), val[~st])
            k1_ok[d] = False
            ev_ptr[d] += 1
        while idx.size:
            due = times_pad[s_ptr[idx]] <= t[idx]
            d = idx[due]
            if not d.size:
                break
            vals = np.asarray(record(t[d], y[:, d], p[:, d], u[:, d]), float)
            if out is None:
                n_rec = vals.shape[0]
                out = np.full((n_rec, m, T), np.nan)
            out[:, d, s_ptr[d]] = vals
            s_ptr[d] += 1
        done = idx[s_ptr[idx] >= T]
        running[done] = False

    def fail(idx: np.ndarray, code: str) -> None:
        status[idx] = STATUS_CODES[code]
        running[idx] = False

    boundary(np.nonzero(running)[0])

    # initial step (Hairer, Nørsett & Wanner, II.4) after the t=0 events
    idx = np.nonzero(running)[0]
    if idx.size and adaptive:
        if opts.first_step is not None:
            h[idx] = opts.first_step
        else:
            yi, pi, ui, ti = y[:, idx], p[:, idx], u[:, idx], t[idx]
            f0 = rhs(ti, yi, pi, ui)
            sc = atol + rtol * np.abs(yi)
            d0, d1 = _rms(yi / sc), _rms(f0 / sc)
            with np.errstate(over="ignore", divide="ignore"):  # np.where evaluates the unused branch too
                h0 = np.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / np.maximum(d1, 1e-300))
            f1 = rhs(ti + h0, yi + h0 * f0, pi, ui)
            d2 = _rms((f1 - f0) / sc) / h0
            dm = np.maximum(d1, d2)
            h1 = np.where(dm <= 1e-15, np.maximum(1e-6, h0 * 1e-3), (0.01 / np.maximum(dm, 1e-300)) ** 0.2)
            h[idx] = np.minimum(100 * h0, h1)
    elif idx.size:
        h[idx] = opts.dt

    it = 0
    while True:
        idx = np.nonzero(running)[0]
        if not idx.size:
            break
        it += 1
        if check is not None and it % opts.check_every == 0:
            check()
        ti = t[idx]
        stop = np.minimum(ev_t[ev_ptr[idx], idx], times_pad[s_ptr[idx]])
        gap = stop - ti
        hi = h[idx]
        hit = hi >= gap
        hs = np.where(hit, gap, hi)
        yi, pi, ui = y[:, idx], p[:, idx], u[:, idx]

        # FSAL: k1 is the last accepted stage unless an event changed the state
        need = ~k1_ok[idx]
        if need.any():
            j = idx[need]
            k1[:, j] = rhs(t[j], y[:, j], p[:, j], u[:, j])
            k1_ok[j] = True
        ks = [k1[:, idx]]
        bad = ~np.all(np.isfinite(ks[0]), axis=0)
        if bad.any():
            fail(idx[bad], "nonfinite")
            continue

        if adaptive:
            for s in range(1, 7):
                acc = yi.copy()
                for j, a in enumerate(_A[s]):
                    if a:
                        acc += (hs * a) * ks[j]
                ks.append(rhs(ti + _C[s] * hs, acc, pi, ui))
            y_new = acc  # stage 7 argument is the 5th-order solution (FSAL)
            err_vec = hs * sum(e * k for e, k in zip(_E, ks) if e)
            sc = atol + rtol * np.maximum(np.abs(yi), np.abs(y_new))
            err = _rms(err_vec / sc)
            err = np.where(np.isfinite(err), err, np.inf)
            ok = err <= 1.0
            fac = np.where(err == 0, 5.0, np.clip(0.9 * np.maximum(err, 1e-300) ** -0.2, 0.2, 5.0))
            fac = np.where(ok, fac, np.minimum(fac, 1.0))
            h_next = hs * fac
            h_next = np.where(ok & hit, np.maximum(h_next, hi), h_next)
        else:
            k2 = rhs(ti + hs / 2, yi + (hs / 2) * ks[0], pi, ui)
            k3 = rhs(ti + hs / 2, yi + (hs / 2) * k2, pi, ui)
            k4 = rhs(ti + hs, yi + hs * k3, pi, ui)
            y_new = yi + (hs / 6) * (ks[0] + 2 * k2 + 2 * k3 + k4)
            ok = np.all(np.isfinite(y_new), axis=0)
            h_next = hi

        steps[idx] += 1
        a = idx[ok]
        t[a] = np.where(hit[ok], stop[ok], ti[ok] + hs[ok])
        y[:, a] = y_new[:, ok]
        if adaptive:
            k1[:, a] = ks[6][:, ok]
            k1_ok[a] = True
        else:
            k1_ok[a] = False
        h[idx] = h_next

        nf = a[~np.all(np.isfinite(y[:, a]), axis=0)]
        if nf.size:
            fail(nf, "nonfinite")
        if not adaptive and (~ok).any():
            fail(idx[~ok], "nonfinite")
        if adaptive:
            r = idx[~ok]
            under = r[h[r] < 1e-14 * np.maximum(np.abs(t[r]), 1.0)]
            if under.size:
                fail(under, "step_underflow")
        over = idx[steps[idx] >= opts.max_steps]
        over = over[running[over]]
        if over.size:
            fail(over, "max_steps")
        landed = a[hit[ok]]
        landed = landed[running[landed]]
        if landed.size:
            boundary(landed)

    if out is None:
        n_rec = np.asarray(record(t[:0], y[:, :0], p[:, :0], u[:, :0])).shape[0]
        out = np.full((n_rec, m, T), np.nan)
    failed = status != 0
    out[:, failed, :] = np.nan
    return out, status
