"""Periodic stimulation of cardiac cell models, pre-pacing, and per-beat biomarkers.

Works with models from kernels/ode/cellml.py: their stimulus current is the piecewise-constant
input ``i_stim_amp`` and their default protocol is kept as parameters ``stim_amplitude``,
``stim_duration``, ``stim_period`` and ``stim_offset``. Beat k (k = 0, 1, ...) stimulates at
``k * cycle_length + offset``: an input event adds the amplitude there and another subtracts it
``duration`` later, so the integrator stops exactly on both pulse edges. Every run starts at
t = 0, from the model's initial state or a given one (e.g. a stored steady state: the kernels'
``y0``).

`pace` integrates N beats and records the last one on a fine grid; `prepace` integrates K beats in
chunks, checks beat-to-beat convergence of the state and returns the final state;
`beat_biomarkers` measures one sampled beat (definitions in its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.ode.cellml import QNET_CURRENTS, STIM_INPUT  # plain constants: no myokit import
from kernels.ode.integrate_numpy import EVENT_INPUT, Events, SolverOptions
from kernels.ode.model import Model

# The integrator chosen for cardiac cells (benchmarks/cardiac_cells.py): Rodas4 (stiff, adaptive,
# analytic Jacobian) at rtol 3e-4 / atol 3e-6 reproduces Myokit-CVODES steady-state APD90 to
# ~0.03 ms on ORd-CiPA, ORd 2011, ToR-ORd and TP06 at ~4 CPU-ms per ORd-CiPA beat. Rush-Larsen is
# not competitive: it needs dt <= 0.002 ms for the hERG Markov model of ORd-CiPA and still misses
# APD90 by ~20 ms there (each Markov state's exponential update ignores the others).
DEFAULT_SOLVER = SolverOptions(method="rodas4", rtol=3e-4, atol=3e-6, max_steps=10**8)


# ------------------------------------------------------------------------------------ protocol
@dataclass
class Protocol:
    """Periodic pulses. None takes the model's default (its stim_* parameter, per patient)."""

    n_beats: int
    cycle_length: float | np.ndarray | None = None
    amplitude: float | np.ndarray | None = None  # stimulus current during a pulse (model units, signed)
    duration: float | np.ndarray | None = None
    offset: float | np.ndarray | None = None  # pulse start within each cycle

    def resolve(self, model: Model, p: np.ndarray) -> dict[str, np.ndarray]:
        """Per-patient arrays [m] of cycle_length, amplitude, duration, offset."""
        m = p.shape[1]
        pn = model.parameter_names
        out = {}
        for key, par in (("cycle_length", "stim_period"), ("amplitude", "stim_amplitude"),
                         ("duration", "stim_duration"), ("offset", "stim_offset")):
            v = getattr(self, key)
            if v is None:
                if par not in pn:
                    raise ValueError(f"model {model.name} has no parameter {par}: give the protocol's {key}")
                v = p[pn.index(par)]
            out[key] = np.broadcast_to(np.asarray(v, float), (m,)).copy()
        if self.n_beats < 0:
            raise ValueError("n_beats must be >= 0")
        if np.any(out["cycle_length"] <= 0) or np.any(out["duration"] < 0):
            raise ValueError("cycle_length must be > 0 and duration >= 0")
        if np.any(out["duration"] >= out["cycle_length"]) or np.any(out["offset"] < 0) \
                or np.any(out["offset"] + out["duration"] > out["cycle_length"]):
            raise ValueError("each pulse must lie inside its cycle: 0 <= offset, offset + duration <= cycle_length")
        return out


def pacing_events(model: Model, p: np.ndarray, protocol: Protocol) -> Events:
    """Events [2 * n_beats, m] for `protocol`: per beat, +amplitude on input i_stim_amp at the pulse
    start and -amplitude at its end."""
    if STIM_INPUT not in model.input_names:
        raise ValueError(f"model {model.name} has no input {STIM_INPUT} (import it with kernels.ode.cellml)")
    m = p.shape[1]
    r = protocol.resolve(model, p)
    n = protocol.n_beats
    k = np.arange(n, dtype=float)[:, None]
    on = k * r["cycle_length"] + r["offset"]  # [n, m]
    tt = np.empty((2 * n, m))
    tt[0::2], tt[1::2] = on, on + r["duration"]
    vv = np.empty((2 * n, m))
    vv[0::2], vv[1::2] = r["amplitude"], -r["amplitude"]
    kk = np.full((2 * n, m), EVENT_INPUT, np.int8)
    gg = np.full((2 * n, m), model.input_names.index(STIM_INPUT), np.int16)
    return Events(tt, kk, gg, vv)


def initial_state(kernel, p: np.ndarray) -> np.ndarray:
    """The model's own initial state [NS, m] (its declared init values for parameters p)."""
    m = p.shape[1]
    out, _ = kernel.run(p, Events.empty(m), np.array([0.0]), SolverOptions(), kernel.model.state_names,
                        np.zeros(m, np.int8))
    return out[:, :, 0]


# ------------------------------------------------------------------------------------- running
@dataclass
class PrepaceResult:
    y: np.ndarray  # [NS, m] state at the end of the last beat (start of the next cycle)
    rel_change: np.ndarray  # [m, beats] max_i |y_i(k) - y_i(k-1)| / max(|y_i(k)|, floor) at each beat end
    beats: int
    converged: np.ndarray  # [m] bool: rel_change of the last beat <= tol (all True without tol)
    status: np.ndarray  # [m] int8 solver status (0 ok)


def prepace(kernel, p: np.ndarray, protocol: Protocol, opts: SolverOptions, y0: np.ndarray | None = None,
            tol: float | None = None, chunk: int = 100, floor: float = 1e-9) -> PrepaceResult:
    """Integrate protocol.n_beats beats in chunks of `chunk` beats and return the final state.

    The state is recorded at every cycle end; its relative change from one beat to the next (max
    over states of |Δy| / max(|y|, floor)) is the convergence measure. With `tol`, pacing stops at
    the end of the first chunk where every cell's last-beat change is <= tol."""
    model = kernel.model
    m = p.shape[1]
    y = initial_state(kernel, p) if y0 is None else np.array(y0, float)
    status = np.zeros(m, np.int8)
    changes: list[np.ndarray] = []
    cl = protocol.resolve(model, p)["cycle_length"]
    if np.any(cl != cl[0]):
        raise ValueError("prepace: patients must share the cycle length (run groups separately)")
    done = 0
    prev = y.copy()
    while done < protocol.n_beats:
        nb = min(chunk, protocol.n_beats - done)
        proto = Protocol(nb, protocol.cycle_length, protocol.amplitude, protocol.duration, protocol.offset)
        times = np.arange(1, nb + 1) * float(cl[0])
        out, st = kernel.run(p, pacing_events(model, p, proto), times, opts, model.state_names, status, y0=y)
        status = st
        ys = np.concatenate([prev[:, :, None], out], axis=2)  # [NS, m, nb+1]
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.abs(np.diff(ys, axis=2)) / np.maximum(np.abs(ys[:, :, 1:]), floor)
        changes.append(np.max(rel, axis=0))
        y = np.where(status[None, :] == 0, out[:, :, -1], np.nan)
        prev = y.copy()
        done += nb
        if tol is not None and np.all(changes[-1][status == 0, -1] <= tol):
            break
    rc = np.concatenate(changes, axis=1) if changes else np.zeros((m, 0))
    conv = np.ones(m, bool) if tol is None or not rc.shape[1] else rc[:, -1] <= tol
    return PrepaceResult(y, rc, done, conv & (status == 0), status)


def beat_grid(stim_time: float, cycle_length: float, fine: float = 0.01, coarse: float = 0.1,
              fine_span: float = 20.0) -> np.ndarray:
    """Sample times for one beat [stim_time, stim_time + cycle_length]: `fine` spacing for
    `fine_span` after the stimulus (the upstroke), `coarse` after."""
    a = stim_time + np.arange(0.0, fine_span, fine)
    b = stim_time + np.arange(fine_span, cycle_length, coarse)
    return np.unique(np.round(np.concatenate([a, b, [stim_time + cycle_length]]), 9))


def pace(kernel, p: np.ndarray, protocol: Protocol, opts: SolverOptions, record: list[str],
         y0: np.ndarray | None = None, fine: float = 0.01, coarse: float = 0.1,
         fine_span: float = 20.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integrate protocol.n_beats beats from y0 (default: the model's initial state); sample the
    last beat from its stimulus for one cycle (see beat_grid). Returns (t [T], samples
    [n_rec, m, T], status [m]); t is relative to the start of the run. Patients share the protocol's
    timing (cycle length and offset); amplitudes may differ."""
    model = kernel.model
    if protocol.n_beats < 1:
        raise ValueError("pace needs at least one beat")
    r = protocol.resolve(model, p)
    cl, off = r["cycle_length"], r["offset"]
    if np.any(cl != cl[0]) or np.any(off != off[0]):
        raise ValueError("pace: patients must share cycle length and offset (run groups separately)")
    ev = pacing_events(model, p, protocol)
    t_stim = (protocol.n_beats - 1) * float(cl[0]) + float(off[0])
    t = beat_grid(t_stim, float(cl[0]), fine, coarse, fine_span)
    y0 = None if y0 is None else np.asarray(y0, float)
    out, st = kernel.run(p, ev, t, opts, record, np.zeros(p.shape[1], np.int8), y0=y0)
    return t, out, st


# ---------------------------------------------------------------------------------- biomarkers
@dataclass
class BeatRules:
    """Thresholds of the rule-based flags (see beat_biomarkers)."""

    ead_rise: float = 0.5  # mV: smallest re-depolarisation counted as an EAD
    rf_threshold: float = -60.0  # mV: repolarisation failure if V stays above this
    ap_threshold: float = 0.0  # mV: no action potential if the peak stays below this


def _cross_down(t, y, level, start):
    """First time after index `start` (per row) where y falls to <= level, linearly interpolated
    between samples; NaN where it never does."""
    m, T = y.shape
    idx = np.arange(T)[None, :]
    mask = (y <= level[:, None]) & (idx > start[:, None])
    has = mask.any(axis=1)
    j = np.where(has, np.argmax(mask, axis=1), 1)
    j = np.maximum(j, 1)
    r = np.arange(m)
    y0, y1 = y[r, j - 1], y[r, j]
    t0, t1 = t[j - 1], t[j]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(y1 != y0, (level - y0) / (y1 - y0), 0.0)
    tc = t0 + np.clip(frac, 0.0, 1.0) * (t1 - t0)
    return np.where(has, tc, np.nan), np.where(has, j, T)


def beat_biomarkers(t: np.ndarray, V: np.ndarray, Cai: np.ndarray | None = None,
                    currents: dict[str, np.ndarray] | None = None,
                    rules: BeatRules | None = None) -> dict[str, np.ndarray]:
    """Biomarkers of one sampled beat per cell. t [T] starts at the stimulus and spans one cycle;
    V, Cai and each current are [m, T]. Rows with non-finite samples give NaN.

    * ``Vrest``: V at the first sample (just before the stimulus acts); ``Vpeak``: max V;
      ``dVdt_max``: largest forward difference quotient; the upstroke time ``t_up`` is the midpoint
      of that sample interval (the time of max dV/dt).
    * ``APD30/50/90``: from t_up to the first time after the peak that V falls to
      Vpeak − x·(Vpeak − Vrest), linearly interpolated between samples (as Myokit's and CiPA's
      APD scripts); ``triangulation`` = APD90 − APD30 (Hondeghem et al. 2001, Circulation 103:2004).
    * ``CaT_amplitude`` = max Cai − Cai at the first sample (diastolic); ``CaTD90``: from the time of
      max dCai/dt to Cai back to diastolic + 10 % of the amplitude, same interpolation.
    * ``qNet``: ∫ (INaL + ICaL + IKr + IKs + IK1 + Ito) dt over the sampled beat (trapezoid on the
      samples), in current × time units of the model (A/F·ms = C/F·1e-3; Dutta et al. 2017,
      Front. Physiol. 8:616, integrate over one cycle). Currents the model lacks count as 0 and
      are listed in nothing here: check the model's outputs.
    * ``EAD`` (1/0): an early afterdepolarisation is "a second depolarisation before repolarisation"
      (McMillan, Gavaghan & Mirams 2017, Toxicol. Res. 6:912). Rule: after the plateau peak —
      the highest V between the first local minimum after the upstroke peak (the phase-1 notch;
      the peak itself when V falls monotonically) and the APD30 crossing — and before the APD90
      crossing (the end of the beat if there is none), V rises above its running minimum by more
      than ``rules.ead_rise`` (0.5 mV), i.e. dV/dt > 0 for a visible stretch, not round-off.
    * ``repolarisation_failure`` (1/0): V never falls below ``rules.rf_threshold`` (−60 mV) after
      the peak within the beat (the AP does not end before the next stimulus).
    * ``no_ap`` (1/0): Vpeak below ``rules.ap_threshold`` (0 mV): the stimulus did not excite; the
      APDs are then NaN.
    """
    rules = rules or BeatRules()
    t = np.asarray(t, float)
    V = np.atleast_2d(np.asarray(V, float))
    m, T = V.shape
    r = np.arange(m)
    good = np.all(np.isfinite(V), axis=1)
    Vz = np.where(good[:, None], V, 0.0)
    dt = np.diff(t)
    dV = np.diff(Vz, axis=1) / dt
    i_up = np.argmax(dV, axis=1)
    t_up = 0.5 * (t[i_up] + t[i_up + 1])
    ip = np.argmax(Vz, axis=1)
    vpeak = Vz[r, ip]
    vrest = Vz[:, 0]
    out: dict[str, np.ndarray] = {"Vrest": vrest.copy(), "Vpeak": vpeak.copy(), "dVdt_max": dV[r, i_up],
                                  "t_up": t_up}
    crossing_idx = {}
    for x in (30, 50, 90):
        level = vpeak - x / 100 * (vpeak - vrest)
        tc, jc = _cross_down(t, Vz, level, ip)
        out[f"APD{x}"] = tc - t_up
        crossing_idx[x] = jc
    out["triangulation"] = out["APD90"] - out["APD30"]

    # EAD: re-depolarisation after the plateau peak, before the APD90 crossing
    idx = np.arange(T)[None, :]
    rising = (np.diff(Vz, axis=1) > 0) & (idx[:, :-1] >= ip[:, None])
    i30 = np.minimum(crossing_idx[30], T - 1)
    notch_any = rising & (idx[:, :-1] < i30[:, None])
    has_notch = notch_any.any(axis=1)
    i_notch = np.where(has_notch, np.argmax(notch_any, axis=1), ip)
    seg = (idx >= i_notch[:, None]) & (idx <= i30[:, None])
    i_plat = np.where(has_notch, np.argmax(np.where(seg, Vz, -np.inf), axis=1), ip)
    i90 = np.minimum(crossing_idx[90], T)
    win = (idx >= i_plat[:, None]) & (idx < i90[:, None])
    runmin = np.minimum.accumulate(np.where(win, Vz, np.inf), axis=1)
    rise = np.where(win, Vz - runmin, 0.0)
    out["EAD"] = (rise.max(axis=1) > rules.ead_rise).astype(float)
    after = idx >= ip[:, None]
    out["repolarisation_failure"] = (np.min(np.where(after, Vz, np.inf), axis=1) > rules.rf_threshold).astype(float)
    no_ap = vpeak < rules.ap_threshold
    out["no_ap"] = no_ap.astype(float)
    for x in (30, 50, 90):
        out[f"APD{x}"][no_ap] = np.nan
    out["triangulation"][no_ap] = np.nan

    if Cai is not None:
        C = np.atleast_2d(np.asarray(Cai, float))
        good &= np.all(np.isfinite(C), axis=1)
        Cz = np.where(np.isfinite(C), C, 0.0)
        dC = np.diff(Cz, axis=1) / dt
        ic_up = np.argmax(dC, axis=1)
        ic_pk = np.argmax(Cz, axis=1)
        c0 = Cz[:, 0]
        amp = Cz[r, ic_pk] - c0
        tc, _ = _cross_down(t, Cz, c0 + 0.1 * amp, ic_pk)
        out["Cai_diastolic"] = c0
        out["CaT_amplitude"] = amp
        out["CaTD90"] = tc - 0.5 * (t[ic_up] + t[ic_up + 1])
    if currents is not None:
        tot = np.zeros((m, T))
        for name in QNET_CURRENTS:
            if name in currents:
                tot = tot + np.atleast_2d(np.asarray(currents[name], float))
        good &= np.all(np.isfinite(tot), axis=1)
        out["qNet"] = np.sum((tot[:, 1:] + tot[:, :-1]) * 0.5 * dt, axis=1)
    for k in out:
        out[k] = np.where(good, out[k], np.nan)
    return out


def ikr_block_factor(conc: float | np.ndarray, ic50: float, hill: float = 1.0) -> np.ndarray:
    """Fraction of IKr conductance left under simple pore block: 1 / (1 + ([D]/IC50)^h)."""
    return 1.0 / (1.0 + (np.asarray(conc, float) / ic50) ** hill)
