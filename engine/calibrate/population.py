"""Population fit (fixed effects, random-effect covariance, residual error) over batched MAP fits.

Laplace EM (the EM algorithm with the conditional distribution of each patient's random effects
replaced by its Laplace approximation N(phi_i, C_i) at the conditional mode, as in FOCE): the
E-step is one batched `map_fit` of all patients under the current (mu, Omega, sigma); the M-step
is closed form for log-normal parameters phi_i ~ N(mu, Omega):

    mu    = mean_i phi_i
    Omega = mean_i [(phi_i - mu)(phi_i - mu)^T + C_i]
    a^2   = sum_ij [(y_ij - f_ij)^2 + s_ij^T C_i s_ij] / N          (additive error)
    b^2   = sum_ij [((y_ij - f_ij)^2 + s_ij^T C_i s_ij) / f_ij^2] / N  (proportional error)

with s_ij = df_ij/dphi_i (the expected squared residual under the linearised conditional). It
iterates until the relative change of every estimate is below `tol`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .map_fit import FIT_STATUS, FitProblem, FitResult, map_fit


@dataclass
class PopulationResult:
    mu: np.ndarray  # [k] log typical values
    omega: np.ndarray  # [k, k]
    err_add: np.ndarray  # [n_out]
    err_prop: np.ndarray  # [n_out]
    iterations: int
    converged: bool
    individual: FitResult
    history: list[dict]

    @property
    def typical(self) -> np.ndarray:
        return np.exp(self.mu)

    def cv(self) -> np.ndarray:
        """Between-subject variability as % CV of the log-normal, sqrt(exp(omega) - 1)."""
        return 100.0 * np.sqrt(np.exp(np.diag(self.omega)) - 1.0)


def chunk_stats(prob: FitProblem, fit: FitResult) -> np.ndarray:
    """Sufficient statistics of one chunk for the M-step, as one flat float vector:
    [n_used, sum phi (k), sum phi phi^T + C (k*k), per output: n_obs, sum e2, sum e2/f^2]."""
    use = fit.status == FIT_STATUS["ok"]
    k = fit.phi.shape[1]
    ph, C = fit.phi[use], fit.cov[use]
    y, f, S = prob.y[:, use], fit.pred[:, use], fit.sens[:, :, use]
    obs = np.isfinite(y)
    e2 = np.where(obs, (np.nan_to_num(y) - f) ** 2 + np.einsum("okit,ikl,olit->oit", S, C, S), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # f = 0 (pre-dose) only matters for proportional error
        rel = np.where(obs, e2 / np.where(obs, f * f, 1.0), 0.0)
    per_out = np.stack([obs.sum(axis=(1, 2)), e2.sum(axis=(1, 2)), rel.sum(axis=(1, 2))], axis=1).reshape(-1)
    return np.concatenate([[use.sum()], ph.sum(axis=0), (np.einsum("ik,il->kl", ph, ph) + C.sum(axis=0)).reshape(-1),
                           per_out]) if k else per_out


def m_step(total: np.ndarray, k: int, n_out: int, error: str, a, b, diagonal: bool):
    n = total[0]
    mu = total[1:1 + k] / n
    om = total[1 + k:1 + k + k * k].reshape(k, k) / n - np.outer(mu, mu)
    om = 0.5 * (om + om.T)
    if diagonal:
        om = np.diag(np.diag(om))
    po = total[1 + k + k * k:].reshape(n_out, 3)
    if error == "additive":
        a = np.sqrt(po[:, 1] / po[:, 0])
    else:
        b = np.sqrt(po[:, 2] / po[:, 0])
    return mu, om, a, b, int(n)


def population_fit_chunks(probs: dict[int, FitProblem], n_chunks: int, comm=None, error: str = "additive",
                          max_iter: int = 200, tol: float = 1e-5, diagonal: bool = True, mu0=None, omega0=None,
                          err_add0=None, err_prop0=None) -> tuple[PopulationResult, dict[int, FitResult]]:
    """Laplace EM over chunks spread on MPI ranks: `probs` holds this rank's chunks (any split).

    Each iteration every rank fits its chunks; the per-chunk statistics are gathered on every rank
    and summed in chunk order, so the estimates are bit-identical for any number of ranks."""
    if error not in ("additive", "proportional"):
        raise ValueError(f"error model {error!r}: additive or proportional")
    any_prob = next(iter(probs.values()), None)
    mu = np.asarray(mu0 if mu0 is not None else any_prob.mu, float).reshape(-1).copy()
    om = np.asarray(omega0 if omega0 is not None else any_prob.omega, float).copy()
    a = np.asarray(err_add0 if err_add0 is not None else any_prob.err_add, float).copy()
    b = np.asarray(err_prop0 if err_prop0 is not None else any_prob.err_prop, float).copy()
    k, n_out = len(mu), len(a)
    phi = {c: None for c in probs}
    hist = []
    converged = False
    fits: dict[int, FitResult] = {}
    for it in range(1, max_iter + 1):
        mine = {}
        for c in sorted(probs):
            fits[c] = map_fit(replace(probs[c], mu=mu, omega=om, err_add=a, err_prop=b), phi0=phi[c])
            phi[c] = fits[c].phi
            mine[c] = chunk_stats(probs[c], fits[c])
        allstats = {}
        for part in (comm.allgather(mine) if comm is not None and comm.size > 1 else [mine]):
            allstats.update(part)
        if sorted(allstats) != list(range(n_chunks)):
            raise RuntimeError(f"population fit: statistics of chunks {sorted(set(range(n_chunks)) - set(allstats))} missing")
        total = np.zeros_like(allstats[0])
        for c in range(n_chunks):  # fixed order: rank-count independent sums
            total = total + allstats[c]
        if total[0] < 2:
            raise RuntimeError(f"population fit: only {int(total[0])} patients fitted at iteration {it}")
        mu_new, om_new, a_new, b_new, n_used = m_step(total, k, n_out, error, a, b, diagonal)
        change = max(np.max(np.abs(mu_new - mu)), np.max(np.abs(np.diag(om_new) / np.diag(om) - 1)),
                     np.max(np.abs(np.r_[a_new - a, b_new - b]) / np.maximum(np.r_[a, b], 1e-12)))
        mu, om, a, b = mu_new, om_new, a_new, b_new
        hist.append({"iteration": it, "mu": mu.tolist(), "omega_diag": np.diag(om).tolist(), "err_add": a.tolist(),
                     "err_prop": b.tolist(), "n_used": n_used, "change": float(change)})
        if change < tol:
            converged = True
            break
    for c in sorted(probs):
        fits[c] = map_fit(replace(probs[c], mu=mu, omega=om, err_add=a, err_prop=b), phi0=phi[c])
    first = fits[min(fits)] if fits else None
    return PopulationResult(mu, om, a, b, it, converged, first, hist), fits


def population_fit(prob: FitProblem, error: str = "additive", max_iter: int = 200, tol: float = 1e-5,
                   diagonal: bool = True) -> PopulationResult:
    """Laplace EM on one batch, from the problem's (mu, omega, error) as starting values."""
    pop, _ = population_fit_chunks({0: prob}, 1, None, error, max_iter, tol, diagonal)
    return pop
