"""Sequential data assimilation for streaming data: an ensemble Kalman filter per twin, forecasts
with prediction intervals, and alert rules on the forecasts.

Every twin carries `members` ensemble members; the members of all twins of a chunk are columns of
one kernel launch (twin i, member j at column i*members + j), so the kernels propagate the whole
chunk between observation times (resuming from each column's state, `kernels.compile` run with
y0/u0/t0). Member j of twin i starts from log parameters phi = mu + L z with z drawn from
engine.rng keyed by (seed, patient index), so a twin's filter does not depend on its chunk or rank.

At each observation time t_k (per twin, only where it has an observation):
  forecast step   propagate members from t_{k-1} to t_k with the therapy events in [t_{k-1}, t_k)
  analysis        stochastic EnKF (perturbed observations) on the augmented vector [states; phi]:
                  x_a = x_f + K (z + e - h(x_f)), K = C_xh / (C_hh + R); states clipped at >= 0,
                  parameter spread inflated by `inflation` against ensemble collapse
  prediction      propagate the analysed members to t_k + horizon (therapy schedule known:
                  basal, announced meals and boluses) and keep quantiles at each lead time
  alerts          P(output crosses the threshold within `within`) = fraction of members whose
                  prediction does (trend rules: rises/falls by more than the threshold); an alert is raised when it rises to `probability` (one alert
                  per predicted event, not one per sample while it stays high) and the twin had
                  no alert of that rule in the last `refractory` time units
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernels.compile import ode_kernel
from kernels.ode.integrate_numpy import Events, SolverOptions
from kernels.ode.model import Model

from . import rng
from .segments import cut_events

STREAM_ENSEMBLE = 21  # initial parameter draws of the ensemble members
STREAM_OBS_PERTURB = 22  # perturbed observations of the stochastic EnKF


@dataclass
class AlertRule:
    name: str
    output: str
    threshold: float
    # below / above: the output crosses `threshold`; rise / fall (trend rules): the output moves
    # by more than `threshold` from its current (analysed) value within `within`
    direction: str = "below"
    within: float = 30.0  # model time units after the forecast origin
    probability: float = 0.5
    refractory: float = 30.0


@dataclass
class EnkfConfig:
    output: str  # observed output
    params: list[str]  # estimated (log scale), part of the filter state
    mu: np.ndarray  # [k] prior mean of log params
    omega: np.ndarray  # [k, k]
    obs_sd: float
    members: int = 32
    inflation: float = 1.02
    horizon: float = 60.0
    lead_step: float = 5.0
    leads: tuple[float, ...] = (30.0, 60.0)  # lead times stored
    quantiles: tuple[float, float, float] = (0.05, 0.5, 0.95)
    rules: list[AlertRule] = field(default_factory=list)
    seed: int = 0
    backend: str = "cpu"
    opts: SolverOptions = field(default_factory=lambda: SolverOptions(rtol=1e-6, atol=1e-8))


@dataclass
class EnkfResult:
    times: np.ndarray  # [T] forecast origins = observation times
    analysis: np.ndarray  # [m, T] ensemble-mean analysed output
    forecast: dict[float, np.ndarray]  # lead -> [3, m, T] quantiles of the output at origin + lead
    params: np.ndarray  # [m, k, T] ensemble-mean log params after each analysis
    param_sd: np.ndarray  # [m, k, T]
    probability: dict[str, np.ndarray]  # rule -> [m, T]
    alert: dict[str, np.ndarray]  # rule -> [m, T] bool (raised at that origin)
    crossing: dict[str, np.ndarray]  # rule -> [m, T] median predicted time of the first crossing (NaN: none)
    status: np.ndarray  # [m] 0 ok, else the kernel's failure code


def _cols(ev: Events, reps: int) -> Events:
    return Events(*(np.repeat(a, reps, axis=1) for a in (ev.time, ev.kind, ev.target, ev.value)))


def run_enkf(model: Model, P: np.ndarray, events: Events, times: np.ndarray, y: np.ndarray, index: np.ndarray,
             cfg: EnkfConfig) -> EnkfResult:
    """Filter twins with parameters P [n_par, m] (estimated rows are replaced by the members'),
    therapy `events`, observations y [m, T] at `times` (NaN: none); `index`: global patient ids."""
    m, T = P.shape[1], len(times)
    N, k = cfg.members, len(cfg.params)
    pn = model.parameter_names
    pidx = [pn.index(p) for p in cfg.params]
    kern = ode_kernel(model, cfg.backend)
    rec = [cfg.output]
    L = np.linalg.cholesky(np.asarray(cfg.omega, float))
    z = rng.normal(cfg.seed, STREAM_ENSEMBLE, index, N * k).reshape(m, N, k)
    phi = (np.asarray(cfg.mu, float) + z @ L.T).reshape(m * N, k)  # column-major over (twin, member)
    PP = np.repeat(P, N, axis=1)
    ev = _cols(events, N)
    status = np.zeros(m * N, np.int8)
    Y = None
    U = None
    t_prev = 0.0
    leads_grid = np.arange(cfg.lead_step, cfg.horizon + 1e-9, cfg.lead_step)
    out_an = np.full((m, T), np.nan)
    fc = {ld: np.full((3, m, T), np.nan) for ld in cfg.leads}
    par = np.full((m, k, T), np.nan)
    psd = np.full((m, k, T), np.nan)
    prob = {r.name: np.zeros((m, T)) for r in cfg.rules}
    alert = {r.name: np.zeros((m, T), bool) for r in cfg.rules}
    cross = {r.name: np.full((m, T), np.nan) for r in cfg.rules}
    R = cfg.obs_sd ** 2
    sd_prior = np.sqrt(np.diag(np.asarray(cfg.omega, float)))
    for t_i, t in enumerate(times):
        for j, pi in enumerate(pidx):
            PP[pi] = np.exp(phi[:, j])
        fin: dict = {}
        win = cut_events(ev, t_prev, t) if t > t_prev else Events.empty(m * N)
        h, status = kern.run(PP, win, np.array([t]), cfg.opts, rec, status, y0=Y, u0=U, t0=t_prev, final=fin)
        Y, U, t_prev = fin["y"], fin["u"], t
        h = h[0, :, 0].reshape(m, N)
        ok_tw = (status.reshape(m, N) == 0).all(axis=1)
        # ---- analysis
        obs = np.isfinite(y[:, t_i]) & ok_tw
        if obs.any():
            X = np.concatenate([Y.reshape(-1, m, N), phi.reshape(m, N, k).transpose(2, 0, 1)], axis=0)  # [n, m, N]
            Xa = X - X.mean(axis=2, keepdims=True)
            ha = h - h.mean(axis=1, keepdims=True)
            Cxh = np.einsum("nmj,mj->nm", Xa, ha) / (N - 1)
            Chh = (ha * ha).sum(axis=1) / (N - 1)
            K = Cxh / (Chh + R)  # [n, m]
            e = rng.normal(cfg.seed, STREAM_OBS_PERTURB, index, N, offset=N * t_i) * cfg.obs_sd  # [m, N]
            innov = np.where(obs[:, None], np.nan_to_num(y[:, t_i])[:, None] + e - h, 0.0)
            X = X + K[:, :, None] * innov[None]
            ns = Y.shape[0]
            Y = np.maximum(X[:ns].reshape(ns, m * N), 0.0)
            ph = X[ns:]  # [k, m, N]
            mean = ph.mean(axis=2, keepdims=True)
            ph = mean + cfg.inflation * (ph - mean)
            # parameters stay within 4 prior sd of the prior mean: an ensemble outlier must not
            # drive a member into a stiff corner where the explicit solver runs out of steps
            lo, hi = np.asarray(cfg.mu) - 4 * sd_prior, np.asarray(cfg.mu) + 4 * sd_prior
            ph = np.clip(ph, lo[:, None, None], hi[:, None, None])
            phi = ph.transpose(1, 2, 0).reshape(m * N, k)
        pm = phi.reshape(m, N, k)
        par[:, :, t_i] = pm.mean(axis=1)
        psd[:, :, t_i] = pm.std(axis=1, ddof=1)
        # analysed output: re-evaluate the output on the analysed state (outputs are algebraic)
        for j, pi in enumerate(pidx):
            PP[pi] = np.exp(phi[:, j])
        # ---- prediction over the horizon (no state change: a separate run from the analysis)
        fin2: dict = {}
        fwin = cut_events(ev, t, t + cfg.horizon, closed=True)
        pred, st2 = kern.run(PP, fwin, np.concatenate([[t], t + leads_grid]), cfg.opts, rec, status.copy(),
                             y0=Y, u0=U, t0=t, final=fin2)
        pred = pred[0].reshape(m, N, -1)  # [m, N, 1 + n_leads]
        out_an[:, t_i] = pred[:, :, 0].mean(axis=1)
        for ld in cfg.leads:
            li = int(round(ld / cfg.lead_step))
            fc[ld][:, :, t_i] = np.quantile(pred[:, :, li] + 0.0, cfg.quantiles, axis=1)
        for r in cfg.rules:
            n_w = int(round(r.within / cfg.lead_step))
            w = pred[:, :, 1:1 + n_w]
            now = pred[:, :, :1]
            hit = {"below": lambda: w < r.threshold, "above": lambda: w > r.threshold,
                   "rise": lambda: w - now > r.threshold, "fall": lambda: now - w > r.threshold}[r.direction]()
            p = hit.any(axis=2).mean(axis=1)
            p[~ok_tw] = np.nan
            prob[r.name][:, t_i] = p
            first = np.where(hit.any(axis=2), leads_grid[np.argmax(hit, axis=2)], np.inf)
            # median first-crossing lead over members (inf: a member that does not cross)
            med = np.median(first, axis=1)
            cross[r.name][:, t_i] = np.where(np.isfinite(med), med, np.nan)
    for r in cfg.rules:
        alert[r.name] = raise_alerts(prob[r.name], times, r.probability, r.refractory)
    st = status.reshape(m, N).max(axis=1)
    return EnkfResult(np.asarray(times, float), out_an, fc, par, psd, prob, alert, cross, st)


def raise_alerts(prob: np.ndarray, times: np.ndarray, threshold: float, refractory: float) -> np.ndarray:
    """[m, T] alerts from probabilities: raised when P rises to `threshold` (one alert per predicted
    event, not one per sample while it stays high), never within `refractory` of the last one."""
    m, T = prob.shape
    out = np.zeros((m, T), bool)
    last = np.full(m, -np.inf)
    prev = np.zeros(m, bool)
    for k in range(T):
        on = np.nan_to_num(prob[:, k]) >= threshold
        a = on & ~prev & (times[k] - last >= refractory)
        out[:, k] = a
        last[a] = times[k]
        prev = on
    return out
