"""Closed-form reference solutions for linear PK models (test oracle).

This module is deliberately independent of the engine: it shares no code with
``engine``/``kernels`` and uses only numpy.  It is the analytic oracle that the
engine's numerical ODE kernels are checked against.

Units: amounts mg, volumes L, clearances L/h, rate constants 1/h, time h.
Concentration is ``C = A_central / V1`` (mg/L).

Models
------
``pk_1cmt``  params ``CL, V1, ka, F``          (k = CL/V1)
``pk_2cmt``  params ``CL, V1, Q, V2, ka, F``   (k10 = CL/V1, k12 = Q/V1, k21 = Q/V2)

Routes: ``iv_bolus`` (amount into central at the dose time), ``iv_infusion``
(zero-order rate amount/duration into central over [time, time+duration]),
``oral`` (F*amount into a depot drained into central at first-order rate ka).
F applies to the oral route only.  ``ka`` and ``F`` are only required when an
oral dose is present.

Formulas (Gibaldi & Perrier, *Pharmacokinetics*, 2nd ed., ch. 1-2, App. C)
--------------------------------------------------------------------------
The system is linear and time-invariant, so the response to a dose list is
the superposition of single-dose responses, each switched on at its dose time
(Heaviside: a dose contributes only for ``t >= time``; a bolus given at
``time`` is included in ``C(time)``).

Unit-bolus central amount (impulse response) h(s):
  1-cmt:  h(s) = exp(-k s)
  2-cmt:  h(s) = [(alpha-k21) exp(-alpha s) + (k21-beta) exp(-beta s)] / (alpha-beta)
with alpha > beta the roots of x^2 - (k10+k12+k21) x + k10 k21 = 0.

Infusion (rate R0 = D/T) is the integral of h over the input window:
  A(t) = R0 * sum_i c_i * int_{max(0,t-T)}^{t} exp(-lam_i s) ds
       = R0 * sum_i c_i * (1-exp(-lam_i t))/lam_i                          (t <= T)
       = R0 * sum_i c_i * exp(-lam_i (t-T)) (1-exp(-lam_i T))/lam_i       (t >  T)
which is the textbook "difference of two step inputs" written without the
subtraction.

Oral is the convolution of the depot output F D ka exp(-ka s) with h:
  A(t) = F D ka * sum_i c_i * (exp(-lam_i t) - exp(-ka t)) / (ka - lam_i)
For 1-cmt this is the Bateman function; for 2-cmt, expanding gives exactly the
textbook tri-exponential
  C = F D ka/V1 * [ (k21-alpha)/((ka-alpha)(beta-alpha)) e^{-alpha t}
                  + (k21-beta)/((ka-beta)(alpha-beta))  e^{-beta t}
                  + (k21-ka)/((alpha-ka)(beta-ka))      e^{-ka t} ].

Numerical accuracy
------------------
The textbook coefficient forms cancel catastrophically (ka ~ alpha/beta/k,
small t, alpha ~ beta, beta << alpha).  Here every expression is a sum of
*non-negative* terms, each evaluated without subtractive cancellation:

* ``disc = (k10+k12-k21)^2 + 4 k12 k21`` (identical to s^2 - 4 k10 k21 but a
  sum of squares), ``alpha - beta = sqrt(disc)``, ``alpha = (s + sqrt(disc))/2``,
  ``beta = k10 k21 / alpha`` (Vieta; no subtraction).
* ``c_a = alpha-k21`` and ``c_b = k21-beta`` are both positive with
  ``c_a + c_b = alpha-beta`` and ``c_a c_b = k12 k21``; the larger is formed
  by subtraction (no cancellation since it is >= half the sum), the smaller
  by the product identity.
* ``(1-exp(-x))/lam`` uses ``-expm1(-x)``.
* the divided difference ``(exp(-a t) - exp(-b t))/(b-a)`` is evaluated as
  ``exp(-min(a,b) t) * t * phi(|b-a| t)`` with ``phi(x) = -expm1(-x)/x``
  (``phi(0) = 1``), which is accurate to a few ulp for every a, b >= 0,
  including the degenerate limit a == b (giving t exp(-a t)).

Hence relative accuracy is a few 1e-16 per dose term, and the superposition
of non-negative terms keeps it; the degenerate cases ka == k / alpha / beta are
therefore supported exactly (their correct limits), not rejected.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

__all__ = [
    "MODELS",
    "ROUTES",
    "concentration",
    "expand_regimen",
    "emax",
    "two_cmt_hybrid",
]

MODELS = ("pk_1cmt", "pk_2cmt")
ROUTES = ("iv_bolus", "iv_infusion", "oral")

_REQUIRED = {
    "pk_1cmt": ("CL", "V1"),
    "pk_2cmt": ("CL", "V1", "Q", "V2"),
}


# ---------------------------------------------------------------------------
# stable elementary pieces
# ---------------------------------------------------------------------------
def _one_minus_exp_over(lam: float, t: np.ndarray) -> np.ndarray:
    """int_0^t exp(-lam s) ds = (1 - exp(-lam t)) / lam, stable (lam >= 0)."""
    if lam == 0.0:
        return np.array(t, dtype=float, copy=True)
    return -np.expm1(-lam * t) / lam


def _phi(x: np.ndarray) -> np.ndarray:
    """phi(x) = (1 - exp(-x)) / x for x >= 0, with phi(0) = 1."""
    x = np.asarray(x, dtype=float)
    out = np.ones_like(x)
    nz = x != 0.0
    out[nz] = -np.expm1(-x[nz]) / x[nz]
    return out


def _dexp(a: float, b: float, t: np.ndarray) -> np.ndarray:
    """(exp(-a t) - exp(-b t)) / (b - a) for t >= 0, a, b >= 0 (symmetric in a, b).

    Equal to int_0^t exp(-b (t-s)) exp(-a s) ds, hence non-negative; the
    a == b limit is t exp(-a t).
    """
    lo, d = min(a, b), abs(b - a)
    return np.exp(-lo * t) * t * _phi(d * t)


def two_cmt_hybrid(CL: float, V1: float, Q: float, V2: float):
    """Return (alpha, beta, c_alpha, c_beta) for the 2-cmt model.

    h(s) = c_alpha exp(-alpha s) + c_beta exp(-beta s) is the central amount
    after a unit IV bolus; c_alpha = (alpha-k21)/(alpha-beta),
    c_beta = (k21-beta)/(alpha-beta), both in [0, 1] and summing to 1.
    """
    k10, k12, k21 = CL / V1, Q / V1, Q / V2
    s = k10 + k12 + k21
    disc = (k10 + k12 - k21) ** 2 + 4.0 * k12 * k21  # == s^2 - 4 k10 k21
    d = math.sqrt(disc)  # alpha - beta
    alpha = 0.5 * (s + d)
    beta = k10 * k21 / alpha
    if d == 0.0:  # only when k12 * k21 == 0 and k10 + k12 == k21: no coupling
        return alpha, beta, 1.0, 0.0
    ua = alpha - k21  # in (0, d)
    ub = k21 - beta  # in (0, d); ua + ub = d, ua * ub = k12 k21
    if ua >= ub:
        ub = k12 * k21 / ua
    else:
        ua = k12 * k21 / ub
    return alpha, beta, ua / d, ub / d


def _exponentials(model: str, p: dict[str, float]):
    """Impulse response of the central amount as [(coef, rate), ...]."""
    if model == "pk_1cmt":
        return [(1.0, p["CL"] / p["V1"])]
    alpha, beta, ca, cb = two_cmt_hybrid(p["CL"], p["V1"], p["Q"], p["V2"])
    return [(ca, alpha), (cb, beta)]


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def _check_params(model: str, params: dict[str, float], need_oral: bool) -> dict:
    if model not in _REQUIRED:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    names = _REQUIRED[model] + (("ka", "F") if need_oral else ())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"{model}: missing parameters {missing}")
    p = {n: float(params[n]) for n in names}
    for n in _REQUIRED[model]:
        if not (p[n] > 0.0 and math.isfinite(p[n])):
            raise ValueError(f"{model}: parameter {n} must be positive and finite, got {p[n]}")
    if need_oral:
        if not (p["ka"] > 0.0 and math.isfinite(p["ka"])):
            raise ValueError(f"ka must be positive and finite, got {p['ka']}")
        if not (p["F"] >= 0.0 and math.isfinite(p["F"])):
            raise ValueError(f"F must be non-negative and finite, got {p['F']}")
    return p


def _single_dose_amount(expo, p, dose: dict, tau: np.ndarray) -> np.ndarray:
    """Central amount for one dose at relative times tau >= 0."""
    route = dose["route"]
    amount = float(dose["amount"])
    if route == "iv_bolus":
        return amount * sum(c * np.exp(-lam * tau) for c, lam in expo)
    if route == "iv_infusion":
        T = dose.get("duration")
        if T is None or not float(T) > 0.0:
            raise ValueError(f"iv_infusion needs a positive 'duration', got {T!r}")
        T = float(T)
        rate = amount / T
        during = tau <= T
        out = np.empty_like(tau)
        td = tau[during]
        ta = tau[~during] - T
        out[during] = sum(c * _one_minus_exp_over(lam, td) for c, lam in expo)
        out[~during] = sum(
            c * np.exp(-lam * ta) * _one_minus_exp_over(lam, np.float64(T)) for c, lam in expo
        )
        return rate * out
    if route == "oral":
        ka, F = p["ka"], p["F"]
        return F * amount * ka * sum(c * _dexp(lam, ka, tau) for c, lam in expo)
    raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")


def concentration(
    model: str, params: dict[str, float], doses: list[dict], t: np.ndarray
) -> np.ndarray:
    """Central concentration C(t) = A_central(t)/V1 for an expanded dose list.

    ``doses``: one dict per administration with keys ``amount``, ``route``,
    ``time`` (default 0) and ``duration`` (``iv_infusion`` only).  The result
    has the shape of ``t``.  Doses at ``time <= t`` contribute (a bolus at
    exactly ``t`` is included; an infusion starting at ``t`` contributes 0).
    """
    t = np.asarray(t, dtype=float)
    need_oral = any(d.get("route") == "oral" for d in doses)
    p = _check_params(model, params, need_oral)
    expo = _exponentials(model, p)
    flat = t.reshape(-1)
    amount = np.zeros_like(flat)
    for dose in doses:
        t0 = float(dose.get("time", 0.0))
        tau = flat - t0
        on = tau >= 0.0
        if not np.any(on):
            # still validate the route/duration of doses that are not yet active
            _single_dose_amount(expo, p, dose, np.zeros(0))
            continue
        amount[on] += _single_dose_amount(expo, p, dose, tau[on])
    return (amount / p["V1"]).reshape(t.shape)


def expand_regimen(
    amount: float,
    route: str,
    time: float = 0.0,
    interval: float | None = None,
    count: int = 1,
    duration: float | None = None,
) -> list[dict]:
    """Expand a regular regimen into one dose dict per administration.

    Administration i (0-based) is at ``time + i*interval``.  ``interval`` is
    required when ``count > 1``.  ``duration`` is required (and only kept) for
    ``iv_infusion``.
    """
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
    count = int(count)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count > 1 and (interval is None or not float(interval) > 0.0):
        raise ValueError("a positive interval is required when count > 1")
    if route == "iv_infusion":
        if duration is None or not float(duration) > 0.0:
            raise ValueError("iv_infusion needs a positive duration")
    doses = []
    for i in range(count):
        d = {"amount": float(amount), "route": route,
             "time": float(time) + (i * float(interval) if i else 0.0)}
        if route == "iv_infusion":
            d["duration"] = float(duration)
        doses.append(d)
    return doses


def emax(C, E0, Emax, EC50, gamma=1.0) -> np.ndarray:
    """Sigmoid Emax (Hill) model E = E0 + Emax * C^g / (EC50^g + C^g).

    Evaluated as E0 + Emax / (1 + (EC50/C)^g) to avoid overflow of C^g;
    C == 0 gives E0 (for gamma > 0).
    """
    C = np.asarray(C, dtype=float)
    if np.any(C < 0):
        raise ValueError("concentrations must be non-negative")
    if not EC50 > 0:
        raise ValueError("EC50 must be positive")
    with np.errstate(divide="ignore"):
        ratio = (EC50 / C) ** gamma  # inf at C == 0 -> fraction 0
    return E0 + Emax / (1.0 + ratio)
