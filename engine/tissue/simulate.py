"""Run one monodomain simulation: time loop, sampling of traces and pseudo-ECG, early stop."""

from __future__ import annotations

import time

import numpy as np

from engine.errors import Interrupted, TwinError
from engine.parallel import SerialComm, lor

from .geometry import Geometry
from .solver import Stimulus, TissueResult, TissueSolver


def combine(comm, tr: list, ecg: list, n_times: int):
    """Rank 0: traces [points, T] and pseudo-ECG [electrodes, T] (or None) from every rank's samples.
    Every rank holds NaN for points it does not own, so the max over ranks picks the owner's value;
    the ECG is the sum of the ranks' partial lead-field sums."""
    tr_a = np.asarray(tr, float).T if tr and len(tr[0]) else np.zeros((0, n_times))
    parts = comm.gather(tr_a, root=0)
    ecg_a = np.asarray(ecg, float).T if ecg else np.zeros((0, n_times))
    eparts = comm.gather(ecg_a, root=0)
    if comm.rank != 0:
        return None, None
    st = np.stack(parts)  # [ranks, points, T]
    traces = np.where(np.isnan(st), -np.inf, st).max(axis=0) if st.size else st.reshape(0, n_times)
    traces[np.isinf(traces)] = np.nan
    e_sum = np.sum(np.stack(eparts), axis=0) if eparts[0].size else None
    return traces, e_sum


class Diverged(TwinError):
    """The potential became non-finite: (dx, dt) or the stimulus is beyond what the scheme handles."""


def lead_field(solver: TissueSolver, geom: Geometry, electrodes, chi: float, cm: float, sigma_bath: float):
    """Weights [n_e, n_local] with  phi_e [mV] = sum_c w[e, c] * div(D grad V)_c [mV/ms].

    Pseudo-ECG in an infinite homogeneous bath:  phi_e = 1/(4 pi sigma_e) * int div(sigma_i grad V) / r dV,
    with sigma_i grad V = chi*Cm*D grad V (uA/mm^2 for chi in 1/mm, Cm in uF/mm^2). sigma_e in S/m is
    1e-3 S/mm, so phi = chi*Cm*dx^3 / (4 pi * 1e-3 * sigma_e) * sum L / r  (uA/mm / (S/mm) = 1e3 uV).
    r is floored at dx/2 so an electrode on a voxel stays finite."""
    if not electrodes:
        return None
    sh = solver.shape
    g = np.meshgrid(*[(np.arange(sh[0]) + solver.x0 - 1) * geom.dx, (np.arange(sh[1]) - 1) * geom.dx,
                      (np.arange(sh[2]) - 1) * geom.dx], indexing="ij")
    own = np.zeros(sh, bool)
    own[solver.own] = True
    own &= solver.mask_h.astype(bool)
    c = chi * cm * geom.dx ** 3 / (4 * np.pi * 1e-3 * sigma_bath)
    w = np.zeros((len(electrodes), solver.n))
    for e, el in enumerate(electrodes):
        r = np.sqrt(sum((g[a] - el.position_mm[a]) ** 2 for a in range(3)))
        w[e] = np.where(own, c / np.maximum(r, geom.dx / 2), 0.0).reshape(-1)
    return w


def simulate(geom: Geometry, model, params, kernels, stimuli: list[Stimulus], dt: float, end_time: float,
             substeps: int = 1, comm=None, points: dict | None = None, trace_every: float = 1.0,
             electrodes=(), chi: float = 140.0, cm: float = 0.01, sigma_bath: float = 0.2,
             thr_act: float = 0.0, thr_rep: float = -70.0, stop_after_activation: float | None = None,
             xp=np, progress=None, checkpoints=None) -> TissueResult:
    """`checkpoints` (engine/tissue/checkpoint.Checkpoints): resume from its state if it has one, and
    save the state whenever it says one is due (at trace samples); Interrupted after a stop signal."""
    comm = comm or SerialComm()
    s = TissueSolver(geom, model, params, kernels, stimuli, dt, substeps, comm, thr_act, thr_rep, xp)
    n_steps = int(round(end_time / dt))
    every = max(1, int(round(trace_every / dt)))
    points = points or {}
    local = {k: s.local_index(v) for k, v in points.items()}
    w = lead_field(s, geom, list(electrodes), chi, cm, sigma_bath)
    tissue_own = np.zeros(s.shape, bool)
    tissue_own[s.own] = True
    tissue_own = (tissue_own & s.mask_h.astype(bool)).reshape(-1)
    times, tr, ecg = [], [], []

    def sample():
        V = s.Y[s.vidx]
        Vh = V if xp is np else xp.asnumpy(V)
        times.append(s.t)
        tr.append([float(Vh[i]) if i is not None else np.nan for i in local.values()])
        if w is not None:
            if s.steps == 0:
                L = np.zeros(s.n)
            else:
                src = s.last_src if xp is np else xp.asnumpy(s.last_src)
                L = (Vh - src) / s.last_h
            ecg.append(w @ np.where(tissue_own, L, 0.0))
        if not np.all(np.isfinite(Vh[tissue_own])):
            return False
        return True

    t0 = time.perf_counter()
    all_act_at = None
    resumed = checkpoints.load(s) if checkpoints is not None else None
    if resumed is not None:
        times, tr, ecg, all_act_at = resumed
    else:
        sample()
    steps0 = s.steps
    while s.steps < n_steps:
        s.step()
        if s.steps % every == 0 or s.steps == n_steps:
            ok = sample()
            if lor(comm, not ok):
                raise Diverged(f"the potential became non-finite by t = {s.t:g} ms (dx = {geom.dx} mm, dt = {dt} ms): "
                               "lower dt")
            if progress:
                progress(s.t, end_time)
            if stop_after_activation is not None:
                a = s.act1 if xp is np else xp.asnumpy(s.act1)
                done = not lor(comm, bool(np.isnan(a[tissue_own]).any()))
                if done and all_act_at is None:
                    all_act_at = s.t
                if all_act_at is not None and s.t >= all_act_at + stop_after_activation:
                    break
            if checkpoints is not None and s.steps < n_steps and checkpoints.due():
                checkpoints.save(s, times, tr, ecg, all_act_at)
                if checkpoints.stopping:
                    raise Interrupted()
    wall = time.perf_counter() - t0
    traces, e_sum = combine(comm, tr, ecg, len(times))
    maps = s.maps()
    n_tissue = int(geom.mask.sum())
    done = s.steps - steps0  # steps computed by this process (a resumed run did the others before)
    stats = {"steps": s.steps, "wall_s": wall, "tissue_voxels": n_tissue,
             "node_updates_per_s": n_tissue * done / wall if wall > 0 else float("nan"),
             "ms_per_step": 1e3 * wall / max(done, 1), "ranks": comm.size}
    if checkpoints is not None and checkpoints.resumed_at is not None:
        stats["resumed_at_ms"] = checkpoints.resumed_at
    return TissueResult(s.t, s.steps, maps, np.asarray(times), traces, e_sum, wall, stats)
