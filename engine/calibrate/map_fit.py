"""Batched maximum-a-posteriori calibration: Levenberg–Marquardt for every patient at once.

Each patient i has log parameters phi_i (k of them) with the population prior phi_i ~ N(mu, Omega)
and observations y_ij ~ N(f_ij(phi_i), sigma_ij^2), sigma_ij^2 = a^2 + (b f_ij)^2 (additive a,
proportional b, per output). The negative log posterior (up to constants)

    L(phi) = 1/2 sum_j r_ij^2 + sum_j log sigma_ij + 1/2 (phi - mu)^T Omega^-1 (phi - mu),
    r_ij = (y_ij - f_ij) / sigma_ij

is minimised with Levenberg–Marquardt on the Gauss–Newton Hessian J^T J + Omega^-1, where J holds
dr/dphi including the dependence of sigma on f. f and df/dphi come from one kernel launch of the
sensitivity-augmented model (`sensitivity.augment`) per iteration for all still-active patients;
each patient keeps its own damping, accepts or rejects its own step, and stops on its own.

The Laplace approximation of the posterior covariance of phi is (J^T J + Omega^-1)^-1 at the mode.
Patients whose fit fails are flagged (FIT_STATUS), never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernels.compile import ode_kernel
from kernels.ode.integrate_numpy import Events, SolverOptions
from kernels.ode.model import Model

from .sensitivity import SensitivityModel, augment

FIT_STATUS = {
    "ok": 0,
    "not_converged": 1,  # iteration budget used up before the convergence tests held
    "simulation_failed": 2,  # the kernel failed at the starting point (status of the ODE solve)
    "no_observations": 3,  # nothing to fit: the estimate is the prior
    "singular": 4,  # non-finite objective or a Hessian that is not positive definite at the end
    "invalid_input": 5,  # invalid fixed parameters or prior
}
FIT_NAMES = {v: k for k, v in FIT_STATUS.items()}

_AUG: dict[tuple, SensitivityModel] = {}


def sensitivity_model(model: Model, params: list[str], outputs: list[str]) -> SensitivityModel:
    key = (id(model), tuple(params), tuple(outputs))
    if key not in _AUG:
        _AUG[key] = augment(model, params, outputs)
    return _AUG[key]


@dataclass
class FitProblem:
    model: Model
    params: list[str]  # estimated (log scale)
    outputs: list[str]  # observed outputs, in the order of y's first axis
    P: np.ndarray  # [n_model_params, m] all parameters (estimated rows are overwritten)
    events: Events  # base-model events [n_ev, m]
    dose_fraction: np.ndarray | None  # [n_ev, m] fraction-parameter index of each bolus (-1 none)
    times: np.ndarray  # [T] union of observation times
    y: np.ndarray  # [n_out, m, T] observations, NaN where none
    mu: np.ndarray  # [m, k] or [k] prior mean of phi
    omega: np.ndarray  # [k, k] prior covariance of phi
    err_add: np.ndarray  # [n_out] additive sd
    err_prop: np.ndarray  # [n_out] proportional sd
    backend: str = "cpu"
    opts: SolverOptions = field(default_factory=lambda: SolverOptions(rtol=1e-8, atol=1e-10))
    # correlation time of the residual errors per output (model time unit); 0 = independent.
    # Errors of one patient and output Δt apart correlate as exp(-Δt/tau) (continuous AR(1), as
    # CGM sensor noise does); residuals are whitened (Prais–Winsten) before the fit.
    err_tau: np.ndarray | None = None

    @property
    def m(self) -> int:
        return self.P.shape[1]


@dataclass
class FitResult:
    phi: np.ndarray  # [m, k] log-parameter estimates
    cov: np.ndarray  # [m, k, k] Laplace covariance of phi
    objective: np.ndarray  # [m] negative log posterior at the estimate (constants dropped)
    chi2: np.ndarray  # [m] sum of squared weighted residuals
    n_obs: np.ndarray  # [m]
    iterations: np.ndarray  # [m]
    status: np.ndarray  # [m] int8 FIT_STATUS
    pred: np.ndarray  # [n_out, m, T] predictions at the estimate
    sens: np.ndarray  # [n_out, k, m, T] d pred / d phi at the estimate
    sigma: np.ndarray  # [n_out, m, T] residual sd at the estimate

    @property
    def theta(self) -> np.ndarray:
        return np.exp(self.phi)

    def sd(self) -> np.ndarray:
        return np.sqrt(np.maximum(np.einsum("mkk->mk", self.cov), 0.0))


def _evaluate(prob: FitProblem, sm: SensitivityModel, phi: np.ndarray, cols: np.ndarray):
    """Predictions, sensitivities and kernel status for patients `cols` at log parameters phi [c, k]."""
    pn = prob.model.parameter_names
    P = prob.P[:, cols].copy()
    for j, p in enumerate(prob.params):
        P[pn.index(p)] = np.exp(phi[:, j])
    ev = Events(*(np.ascontiguousarray(a[:, cols]) for a in (prob.events.time, prob.events.kind,
                                                                 prob.events.target, prob.events.value)))
    if prob.dose_fraction is not None:
        # bolus amounts were scaled by the fraction parameter when the events were built: rescale
        for j, p in enumerate(prob.params):
            hit = prob.dose_fraction[:, cols] == pn.index(p)
            if hit.any():
                ev.value[hit] *= (P[pn.index(p)] / prob.P[pn.index(p), cols])[np.nonzero(hit)[1]]
        ev = sm.events(ev, P, prob.dose_fraction[:, cols])
    kernel = ode_kernel(sm.model, prob.backend)
    status = np.zeros(len(cols), np.int8)
    out, status = kernel.run(P, ev, prob.times, prob.opts, sm.record(), status)
    vals, sens = sm.split(out)
    return vals, sens, status


def _terms(prob: FitProblem, y, f, S, phi, mu, Linv):
    """Objective, gradient and Gauss–Newton Hessian for a set of patients.

    y, f [n_out, c, T]; S [n_out, k, c, T]; phi, mu [c, k]."""
    a = prob.err_add[:, None, None]
    b = prob.err_prop[:, None, None]
    obs = np.isfinite(y)
    sig = np.sqrt(a * a + (b * f) ** 2)
    sig = np.where(obs, sig, 1.0)
    r = np.where(obs, (np.nan_to_num(y) - f) / sig, 0.0)
    dsig = (b * b * f / sig)[:, None] * S  # d sigma / d phi  [n_out, k, c, T]
    J = -(S / sig[:, None]) - (r / sig)[:, None] * dsig  # d r / d phi
    J = np.where(obs[:, None], J, 0.0)
    dlog = np.where(obs[:, None], dsig / sig[:, None], 0.0)  # d log sigma / d phi
    if prob.err_tau is not None and np.any(np.asarray(prob.err_tau) > 0):
        r, J = _whiten(prob.times, obs, r, J, np.asarray(prob.err_tau, float))
    d = phi - mu
    rp = np.einsum("kl,cl->ck", Linv, d)
    obj = 0.5 * (r * r).sum(axis=(0, 2)) + np.where(obs, np.log(sig), 0.0).sum(axis=(0, 2)) + 0.5 * (rp * rp).sum(1)
    grad = np.einsum("okct,oct->ck", J, r) + dlog.sum(axis=(0, 3)).T + np.einsum("lk,cl->ck", Linv, rp)
    H = np.einsum("okct,olct->ckl", J, J) + (Linv.T @ Linv)[None]
    chi2 = (r * r).sum(axis=(0, 2))
    return obj, grad, H, chi2, sig


def _whiten(times, obs, r, J, tau):
    """AR(1) whitening along time of each patient's observed residuals and their Jacobian rows:
    e_i' = (e_i - c e_prev) / sqrt(1 - c^2), c = exp(-(t_i - t_prev)/tau); the first stays as is.
    (The Jacobian of the log-determinant term is zero: c does not depend on phi.)"""
    r, J = r.copy(), J.copy()
    n_out, c_n, T = r.shape
    for o in range(n_out):
        if tau[o] <= 0:
            continue
        last_t = np.full(c_n, np.nan)
        last_r = np.zeros(c_n)
        last_J = np.zeros((J.shape[1], c_n))
        for t in range(T):
            ob = obs[o, :, t]
            if not ob.any():
                continue
            has = ob & np.isfinite(last_t)
            c = np.where(has, np.exp(-(times[t] - np.nan_to_num(last_t)) / tau[o]), 0.0)
            s = 1.0 / np.sqrt(1.0 - c * c)
            raw_r, raw_J = r[o, :, t].copy(), J[o, :, :, t].copy()
            r[o, :, t] = np.where(ob, (raw_r - c * last_r) * s, r[o, :, t])
            J[o, :, :, t] = np.where(ob, (raw_J - c * last_J) * s, J[o, :, :, t])
            last_t = np.where(ob, times[t], last_t)
            last_r = np.where(ob, raw_r, last_r)
            last_J = np.where(ob, raw_J, last_J)
    return r, J


def map_fit(prob: FitProblem, phi0: np.ndarray | None = None, max_iter: int = 100, tol: float = 1e-9,
            status_in: np.ndarray | None = None) -> FitResult:
    """MAP estimates for all patients of `prob` (see module docstring)."""
    sm = sensitivity_model(prob.model, prob.params, prob.outputs)
    m, k = prob.m, len(prob.params)
    mu = np.broadcast_to(np.asarray(prob.mu, float), (m, k)).copy()
    phi = mu.copy() if phi0 is None else np.array(phi0, float).reshape(m, k)
    Linv = np.linalg.inv(np.linalg.cholesky(np.asarray(prob.omega, float)))
    n_out, T = len(prob.outputs), len(prob.times)
    status = np.zeros(m, np.int8) if status_in is None else np.asarray(status_in, np.int8).copy()
    n_obs = np.isfinite(prob.y).sum(axis=(0, 2))
    lam = np.full(m, 1e-3)
    it = np.zeros(m, np.int32)
    pred = np.full((n_out, m, T), np.nan)
    sens = np.full((n_out, k, m, T), np.nan)
    sigma = np.full((n_out, m, T), np.nan)
    obj = np.full(m, np.nan)
    grad = np.zeros((m, k))
    H = np.zeros((m, k, k))
    chi2 = np.full(m, np.nan)

    def terms(cols, ph, f, S):
        return _terms(prob, prob.y[:, cols], f, S, ph, mu[cols], Linv)

    ok0 = np.nonzero(status == 0)[0]
    if ok0.size:
        f, S, st = _evaluate(prob, sm, phi[ok0], ok0)
        bad = st != 0
        status[ok0[bad]] = FIT_STATUS["simulation_failed"]
        good = ok0[~bad]
        pred[:, good], sens[:, :, good] = f[:, ~bad], S[:, :, ~bad]
        o, g, h, c2, sg = terms(good, phi[good], f[:, ~bad], S[:, :, ~bad])
        obj[good], grad[good], H[good], chi2[good], sigma[:, good] = o, g, h, c2, sg
    active = (status == 0)
    nonfinite = active & ~np.isfinite(obj)
    status[nonfinite] = FIT_STATUS["singular"]
    active &= ~nonfinite
    done = np.zeros(m, bool)
    for _ in range(max_iter):
        cols = np.nonzero(active & ~done)[0]
        if not cols.size:
            break
        it[cols] += 1
        Hc = H[cols]
        D = np.einsum("ckk->ck", Hc)
        A = Hc + lam[cols, None, None] * np.einsum("ck,kl->ckl", D, np.eye(k))
        try:
            step = -np.linalg.solve(A, grad[cols][..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.stack([np.linalg.lstsq(a, -g, rcond=None)[0] for a, g in zip(A, grad[cols])])
        step = np.clip(step, -2.0, 2.0)  # at most a factor e^2 per iteration: keeps the ODE solve sane
        trial = phi[cols] + step
        f, S, st = _evaluate(prob, sm, trial, cols)
        o, g, h, c2, sg = terms(cols, trial, f, S)
        better = (st == 0) & np.isfinite(o) & (o <= obj[cols])
        acc = cols[better]
        dec = obj[acc] - o[better]
        phi[acc], obj[acc], grad[acc], H[acc], chi2[acc] = trial[better], o[better], g[better], h[better], c2[better]
        pred[:, acc], sens[:, :, acc], sigma[:, acc] = f[:, better], S[:, :, better], sg[:, better]
        lam[acc] = np.maximum(lam[acc] / 10.0, 1e-9)
        rej = cols[~better]
        lam[rej] *= 10.0
        # converged: an accepted step that changed the objective and parameters by almost nothing,
        # or a gradient at rounding level, or no step can reduce the objective any more
        small = (dec <= tol * (1.0 + np.abs(obj[acc]))) & (np.abs(step[better]).max(axis=1) < 1e-5)
        done[acc[small]] = True
        gsmall = np.abs(grad[cols]).max(axis=1) < 1e-8 * (1.0 + np.abs(obj[cols]))
        done[cols[gsmall]] = True
        done[rej[lam[rej] > 1e8]] = True
    status[active & ~done] = FIT_STATUS["not_converged"]
    cov = np.full((m, k, k), np.nan)
    fin = np.isfinite(H).all(axis=(1, 2)) & (status != FIT_STATUS["simulation_failed"]) & (status != FIT_STATUS["invalid_input"])
    for i in np.nonzero(fin)[0]:
        try:
            L = np.linalg.cholesky(H[i])
            Li = np.linalg.inv(L)
            cov[i] = Li.T @ Li
        except np.linalg.LinAlgError:
            if status[i] == 0:
                status[i] = FIT_STATUS["singular"]
    status[(status == 0) & (n_obs == 0)] = FIT_STATUS["no_observations"]
    return FitResult(phi, cov, obj, chi2, n_obs, it, status, pred, sens, sigma)
