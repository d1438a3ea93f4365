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


def population_fit(prob: FitProblem, error: str = "additive", max_iter: int = 200, tol: float = 1e-5,
                   diagonal: bool = True) -> PopulationResult:
    """Laplace EM from the problem's (mu, omega, error) as starting values; `error`: additive or proportional."""
    if error not in ("additive", "proportional"):
        raise ValueError(f"error model {error!r}: additive or proportional")
    mu = np.asarray(prob.mu, float).reshape(-1).copy()
    om = np.asarray(prob.omega, float).copy()
    a, b = prob.err_add.copy(), prob.err_prop.copy()
    phi = None
    hist = []
    converged = False
    for it in range(1, max_iter + 1):
        p = replace(prob, mu=mu, omega=om, err_add=a, err_prop=b)
        fit = map_fit(p, phi0=phi)
        use = fit.status == FIT_STATUS["ok"]
        if use.sum() < 2:
            raise RuntimeError(f"population fit: only {int(use.sum())} patients fitted at iteration {it}")
        phi = fit.phi
        ph, C = fit.phi[use], fit.cov[use]
        mu_new = ph.mean(axis=0)
        d = ph - mu_new
        om_new = (np.einsum("ik,il->kl", d, d) + C.sum(axis=0)) / use.sum()
        if diagonal:
            om_new = np.diag(np.diag(om_new))
        y = prob.y[:, use]
        f = fit.pred[:, use]
        S = fit.sens[:, :, use]
        obs = np.isfinite(y)
        e2 = np.where(obs, (np.nan_to_num(y) - f) ** 2 + np.einsum("okit,ikl,olit->oit", S, C, S), 0.0)
        n = obs.sum(axis=(1, 2))
        if error == "additive":
            a_new, b_new = np.sqrt(e2.sum(axis=(1, 2)) / n), b
        else:
            b_new = np.sqrt(np.where(obs, e2 / np.where(obs, f * f, 1.0), 0.0).sum(axis=(1, 2)) / n)
            a_new = a
        change = max(np.max(np.abs(mu_new - mu)), np.max(np.abs(np.diag(om_new) / np.diag(om) - 1)),
                     np.max(np.abs(np.r_[a_new - a, b_new - b]) / np.maximum(np.r_[a, b], 1e-12)))
        mu, om, a, b = mu_new, om_new, a_new, b_new
        hist.append({"iteration": it, "mu": mu.tolist(), "omega_diag": np.diag(om).tolist(), "err_add": a.tolist(),
                     "err_prop": b.tolist(), "n_used": int(use.sum()), "change": float(change)})
        if change < tol:
            converged = True
            break
    final = map_fit(replace(prob, mu=mu, omega=om, err_add=a, err_prop=b), phi0=phi)
    return PopulationResult(mu, om, a, b, it, converged, final, hist)
