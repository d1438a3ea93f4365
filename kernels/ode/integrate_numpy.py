"""Per-patient time loop, vectorised over a chunk: the NumPy reference of the kernel-per-trajectory
design. Every patient carries its own time, step size, event pointer and sample pointer; one pass
of the loop attempts one step for every patient still running, so each patient's arithmetic is the
same whatever else is in the chunk.

Events (doses) stop the integrator exactly at their times: the step is clipped to land on the next
event or sample time, the event is applied, and integration restarts from there. At a time that is
both a dose and a sample, the dose is applied first (outputs are post-dose).

Integrators: adaptive Dormand–Prince 5(4) (FSAL, Hairer's error norm and step control, per-patient
rtol/atol); fixed-step classic RK4 (steps clipped to land on events/samples); adaptive Rodas4
(Hairer & Wanner's stiffly accurate 6-stage Rosenbrock method of order 4(3), with the analytic
Jacobian and df/dt generated from the declaration and a per-patient LU with partial pivoting);
and fixed-step Rush–Larsen (gating states, whose derivative is affine in themselves, advance by
the exact exponential of their frozen linearisation; the rest by forward Euler).
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

# Rodas4 (Hairer & Wanner 1996, as in their rodas.f), G·K form:  G = I/(h·γ) − J,
# G·K_i = f(t + α_i h, y + Σ A_ij K_j) + Σ (C_ij / h) K_j + h γ_i ∂f/∂t;  y1 = y + Σ M_i K_i;  err = K_6
RODAS_GAMMA = 0.25
RODAS_ALPHA = np.array([0.0, 0.386, 0.210, 0.630, 1.0, 1.0])
RODAS_GAMMAI = np.array([0.25, -0.1043, 0.1035, -0.3620000000000023e-01, 0.0, 0.0])
_RA = [0.1544000000000000e+01, 0.9466785280815826e+00, 0.2557011698983284e+00, 0.3314825187068521e+01,
       0.2896124015972201e+01, 0.9986419139977817e+00, 0.1221224509226641e+01, 0.6019134481288629e+01,
       0.1253708332932087e+02, -0.6878860361058950e+00]
_RC = [-0.5668800000000000e+01, -0.2430093356833875e+01, -0.2063599157091915e+00, -0.1073529058151375e+00,
       -0.9594562251023355e+01, -0.2047028614809616e+02, 0.7496443313967647e+01, -0.1024680431464352e+02,
       -0.3399990352819905e+02, 0.1170890893206160e+02, 0.8083246795921522e+01, -0.7981132988064893e+01,
       -0.3152159432874371e+02, 0.1631930543123136e+02, -0.6058818238834054e+01]
_RA += [_RA[6], _RA[7], _RA[8], _RA[9], 1.0]
RODAS_A = [[_RA[(i - 1) * i // 2 + j] for j in range(i)] for i in range(6)]  # row i, j < i
RODAS_C = [[_RC[(i - 1) * i // 2 + j] for j in range(i)] for i in range(6)]
RODAS_M = np.array([_RA[6], _RA[7], _RA[8], _RA[9], 1.0, 1.0])

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
    jac: Callable | None = None,
    dfdt: Callable | None = None,
    rl_b: Callable | None = None,
    u0: np.ndarray | None = None,
    t0: float = 0.0,
    final: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Integrate every patient from t0 (state y0, inputs u0) through all sample `times`.

    Continuing a run segment by segment (a controller acting between segments) gives the same
    result as one call when no input changes: pass the previous segment's final state, inputs and
    end time. If `final` is a dict it receives "y" and "u" at the last sample time.

    rhs(t, y, p, u) -> dy; record(t, y, p, u) -> [n_rec, m] values stored at sample times.
    Returns (samples [n_rec, m, T] with NaN where a patient failed, status int8 [m]).
    Patients whose incoming `status` is non-zero are not integrated.
    """
    n_s, m = y0.shape
    T = len(times)
    status = np.zeros(m, np.int8) if status is None else status.astype(np.int8).copy()
    y = np.array(y0, dtype=float)
    u = np.zeros((n_inputs, m)) if u0 is None else np.array(u0, dtype=float).reshape(n_inputs, m)
    t = np.full(m, float(t0))
    atol = np.broadcast_to(np.asarray(opts.atol, float).reshape(-1, 1) if np.ndim(opts.atol) else opts.atol, (n_s, 1))
    rtol = opts.rtol
    if opts.method not in ("dopri5", "rk4", "rodas4", "rush_larsen"):
        raise ValueError(f"unknown method {opts.method!r}")
    adaptive = opts.method in ("dopri5", "rodas4")
    rodas = opts.method == "rodas4"
    if rodas and (jac is None or dfdt is None):
        raise ValueError("rodas4 needs the model's Jacobian and df/dt")
    if opts.method == "rush_larsen" and rl_b is None:
        raise ValueError("rush_larsen needs the model's gating coefficients")

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
    if n_s == 0:  # a model of pure algebra (e.g. SBML with assignment rules only): no time stepping
        while True:
            idx = np.nonzero(running)[0]
            if not idx.size:
                break
            t[idx] = np.minimum(ev_t[ev_ptr[idx], idx], times_pad[s_ptr[idx]])
            boundary(idx)

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

        if rodas:
            y_new, err_vec = _rodas_step(rhs, jac, dfdt, ti, yi, pi, ui, hs, ks[0])
            sc = atol + rtol * np.maximum(np.abs(yi), np.abs(y_new))
            err = _rms(err_vec / sc)
            err = np.where(np.isfinite(err) & np.all(np.isfinite(y_new), axis=0), err, np.inf)
            ok = err <= 1.0
            fac = np.where(err == 0, 6.0, np.clip(0.9 * np.maximum(err, 1e-300) ** -0.25, 0.2, 6.0))
            fac = np.where(ok, fac, np.minimum(fac, 1.0))
            h_next = hs * fac
            h_next = np.where(ok & hit, np.maximum(h_next, hi), h_next)
        elif opts.method == "rush_larsen":
            z = rl_b(ti, yi, pi, ui) * hs
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                phi = np.where(np.abs(z) < 1e-8, 1.0 + 0.5 * z, np.expm1(z) / z)
            y_new = yi + hs * (ks[0] * phi)
            ok = np.all(np.isfinite(y_new), axis=0)
            h_next = hi
        elif adaptive:
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
            with np.errstate(divide="ignore", invalid="ignore"):  # err**-0.2 as exp/log, as the C kernel does
                fac = np.where(err == 0, 5.0, np.clip(0.9 * np.exp(-0.2 * np.log(np.maximum(err, 1e-300))), 0.2, 5.0))
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
        if adaptive and not rodas:
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
    if final is not None:
        y[:, failed] = np.nan
        final["y"], final["u"] = y, u
    return out, status


def _lu(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In-place batched LU with partial pivoting of G [n, n, m]; returns (LU, row permutation [n, m]).

    Written element by element in the same order as the C kernel so both round alike."""
    n, _, m = G.shape
    perm = np.tile(np.arange(n)[:, None], (1, m))
    cols = np.arange(m)
    for k in range(n):
        piv = k + np.argmax(np.abs(G[k:, k]), axis=0)  # first maximum, as the C loop with '>'
        sw = piv != k
        if sw.any():
            c = cols[sw]
            rk, rp = G[k, :, c].copy(), G[piv[sw], :, c].copy()
            G[k, :, c], G[piv[sw], :, c] = rp, rk
            pk = perm[k, c].copy()
            perm[k, c] = perm[piv[sw], c]
            perm[piv[sw], c] = pk
        for i in range(k + 1, n):
            G[i, k] = G[i, k] / G[k, k]
            for j in range(k + 1, n):
                G[i, j] = G[i, j] - G[i, k] * G[k, j]
    return G, perm


def _lu_solve(LU: np.ndarray, perm: np.ndarray, b: np.ndarray) -> np.ndarray:
    n, m = b.shape
    x = np.take_along_axis(b, perm, axis=0)
    for i in range(n):
        for j in range(i):
            x[i] = x[i] - LU[i, j] * x[j]
    for i in range(n - 1, -1, -1):
        for j in range(i + 1, n):
            x[i] = x[i] - LU[i, j] * x[j]
        x[i] = x[i] / LU[i, i]
    return x


def _fd_fix(rhs, J, t, y, p, u, f0):
    """Columns with non-finite analytic entries (e.g. d/dC C**g at C = 0 with g < 1) are replaced
    by forward differences; anything still non-finite becomes 0 (a W-method step, error-controlled)."""
    n = y.shape[0]
    for j in range(n):
        bad = ~np.all(np.isfinite(J[:, j]), axis=0)
        if bad.any():
            d = np.sqrt(np.finfo(float).eps) * np.maximum(np.abs(y[j, bad]), 1e-8)
            yp = y[:, bad].copy()
            yp[j] = yp[j] + d
            col = (rhs(t[bad], yp, p[:, bad], u[:, bad]) - f0[:, bad]) / d
            J[:, j, bad] = np.where(np.isfinite(col), col, 0.0)
    return J


def _rodas_step(rhs, jac, dfdt, t, y, p, u, h, f0):
    n, m = y.shape
    with np.errstate(all="ignore"):  # non-finite entries are expected and repaired below
        J = np.asarray(jac(t, y, p, u), float).reshape(n, n, m)
    J = _fd_fix(rhs, J.copy(), t, y, p, u, f0)
    Ft = np.asarray(dfdt(t, y, p, u), float).reshape(n, m)
    Ft = np.where(np.isfinite(Ft), Ft, 0.0)
    G = -J
    inv = 1.0 / (h * RODAS_GAMMA)
    for i in range(n):
        G[i, i] = G[i, i] + inv
    LU, perm = _lu(G)
    K = []
    for i in range(6):
        if i == 0:
            F = f0
        else:
            Yi = y.copy()
            for j in range(i):
                Yi = Yi + RODAS_A[i][j] * K[j]
            F = rhs(t + RODAS_ALPHA[i] * h, Yi, p, u)
        b = F.copy()
        for j in range(i):
            b = b + (RODAS_C[i][j] / h) * K[j]
        b = b + (h * RODAS_GAMMAI[i]) * Ft
        K.append(_lu_solve(LU, perm, b))
    y_new = y.copy()
    for i in range(6):
        y_new = y_new + RODAS_M[i] * K[i]
    return y_new, K[5]
