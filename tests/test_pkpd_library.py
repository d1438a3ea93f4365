"""The PK/PD library (engine/models/pkpd_library.py) against independent references.

Every model runs a 12-patient cohort (parameters spread ±30-50 % around typical values, fractional
Hill exponents, four arms: repeated oral, repeated IV bolus off the sample grid, repeated infusions,
and a mixed oral + bolus + overlapping-infusion regimen) through the NumPy kernel at rtol 1e-11, with
events built by `engine.dosing.build_events`. The reference is scipy's DOP853 at rtol 1e-12 on a
right-hand side written here from the textbook equations (not from the declarations), restarted at
every dose / infusion switch, with the regimen expanded here (not by the engine).

Tolerance: relative error ≤ 1e-7 wherever |value| > 1e-6·max|value| of that patient's trajectory,
absolute ≤ 1e-7·max|value| elsewhere. The kernel's global error at rtol 1e-11 is ~1e-10 and the
reference's ~1e-12 (measured worst cases are printed with -s), so 1e-7 leaves ≥ 100× margin for
platform / BLAS differences, while any modelling mistake (a sign, a missing F, a Hill exponent on
the wrong term, dose timing, an infusion that ends late) shows as 1e-3 or more. Below 1e-6·max
(e.g. a depot long after absorption, C before the first oral dose is absorbed) relative error only
measures atol.

Closed forms: pk_3cmt against matrix exponentials of its rate matrix (all routes, exact for a linear
system) and the bolus tri-exponential from an eigen-decomposition; pk_1cmt_mm against the Lambert-W
solution of an IV bolus and the linear limit C << Km (CL = Vmax/Km); IDR models' drug-free steady
state R0 = kin/kout and their steady state under a long constant infusion. Properties: effect-
compartment hysteresis; IDR I/IV lower and II/III raise the response.
"""

from __future__ import annotations

import math
import textwrap
import time

import h5py
import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.linalg import expm
from scipy.special import lambertw

from engine.config import Arm, Dose, load_job
from engine.dosing import build_events
from engine.models import get_model
from engine.parallel import SerialComm
from engine.runner import run
from kernels.compile import ode_kernel
from kernels.ode.integrate_numpy import SolverOptions
from tests.helpers import small_job
from tests.reference.pk_analytic import concentration, expand_regimen

N = 12
TIMES = np.arange(0.0, 60.0 + 1e-9, 0.5)
KERNEL_OPTS = SolverOptions(rtol=1e-11, atol=1e-13)
REF_RTOL, REF_ATOL = 1e-12, 1e-14
TOL = 1e-7

ARMS = [
    Arm(name="oral", doses=[Dose(amount=150.0, route="oral", time=0.0, interval=12.0, count=4)]),
    Arm(name="bolus", doses=[Dose(amount=80.0, route="iv_bolus", time=1.3, interval=8.0, count=5)]),
    Arm(name="infusion", doses=[Dose(amount=120.0, route="iv_infusion", time=0.5, interval=12.0, count=3,
                                     duration=1.5)]),
    Arm(name="mixed", doses=[Dose(amount=200.0, route="oral", time=0.0),
                             Dose(amount=40.0, route="iv_bolus", time=6.25),
                             Dose(amount=60.0, route="iv_infusion", time=5.0, duration=3.0)]),
]

# typical values; PK parameters get lognormal spread, Hill exponents / Imax a uniform one
TYPICAL = {
    "pk_3cmt": dict(CL=5.0, V1=20.0, Q2=15.0, V2=40.0, Q3=2.0, V3=150.0, ka=1.2, F=0.7),
    "pk_1cmt_mm": dict(Vmax=20.0, Km=3.0, V1=30.0, ka=1.0, F=0.8),
    "pk_2cmt_effect": dict(CL=5.0, V1=30.0, Q=10.0, V2=50.0, ka=1.0, F=0.7, ke0=0.4, E0=5.0, Emax=90.0,
                           EC50=1.5, gamma=1.0),
    **{f"pk_2cmt_idr{n}": dict(CL=5.0, V1=30.0, Q=10.0, V2=50.0, ka=1.0, F=0.7, kin=12.0, kout=0.3,
                               **({"Imax": 0.8, "IC50": 1.5} if n <= 2 else {"Emax": 2.5, "EC50": 1.5}), gamma=1.0)
       for n in (1, 2, 3, 4)},
}
MODEL_NAMES = list(TYPICAL)


def cohort(name: str, n: int = N, seed: int = 11) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = {}
        for k, v in TYPICAL[name].items():
            if k == "gamma":
                p[k] = rng.uniform(0.6, 2.6)
            elif k == "Imax":
                p[k] = rng.uniform(0.5, 1.0)
            elif k == "F":
                p[k] = rng.uniform(0.4, 1.0)
            elif k == "E0":
                p[k] = v
            else:
                p[k] = v * math.exp(0.3 * rng.standard_normal())
        out.append(p)
    return out


# ---------------------------------------------------------------- the engine side
def run_kernel(name: str, params: list[dict], arms: list[Arm], arm_idx, times=TIMES, opts=KERNEL_OPTS):
    model = get_model(name)
    P = np.array([[p[k] for p in params] for k in model.parameter_names], float)
    ai = np.asarray(arm_idx)
    ev = build_events(model, arms, ai, P)
    record = model.observable()
    status = np.zeros(len(params), np.int8)
    out, st = ode_kernel(model, "numpy").run(P, ev, times, opts, record, status)
    assert (st == 0).all(), st
    return {r: out[i] for i, r in enumerate(record)}


# ---------------------------------------------------------------- independent reference
def _pk2(y, p, rate):
    dep, cen, per = y[0], y[1], y[2]
    return [-p["ka"] * dep,
            p["ka"] * dep - p["CL"] / p["V1"] * cen - p["Q"] / p["V1"] * cen + p["Q"] / p["V2"] * per + rate,
            p["Q"] / p["V1"] * cen - p["Q"] / p["V2"] * per]


def _hill(c, top, c50, g):
    c = max(c, 0.0)
    return top * c**g / (c50**g + c**g)


def _rhs_3cmt(y, p, rate):
    dep, cen, p1, p2 = y
    k10, k12, k21 = p["CL"] / p["V1"], p["Q2"] / p["V1"], p["Q2"] / p["V2"]
    k13, k31 = p["Q3"] / p["V1"], p["Q3"] / p["V3"]
    return [-p["ka"] * dep, p["ka"] * dep - (k10 + k12 + k13) * cen + k21 * p1 + k31 * p2 + rate,
            k12 * cen - k21 * p1, k13 * cen - k31 * p2]


def _rhs_mm(y, p, rate):
    dep, cen = y
    c = cen / p["V1"]
    return [-p["ka"] * dep, p["ka"] * dep - p["Vmax"] * c / (p["Km"] + c) + rate]


def _rhs_effect(y, p, rate):
    return [*_pk2(y, p, rate), p["ke0"] * (y[1] / p["V1"] - y[3])]


def _rhs_idr(n):
    def f(y, p, rate):
        c, r = y[1] / p["V1"], y[3]
        kin, kout = p["kin"], p["kout"]
        if n == 1:
            dr = kin * (1 - _hill(c, p["Imax"], p["IC50"], p["gamma"])) - kout * r
        elif n == 2:
            dr = kin - kout * (1 - _hill(c, p["Imax"], p["IC50"], p["gamma"])) * r
        elif n == 3:
            dr = kin * (1 + _hill(c, p["Emax"], p["EC50"], p["gamma"])) - kout * r
        else:
            dr = kin - kout * (1 + _hill(c, p["Emax"], p["EC50"], p["gamma"])) * r
        return [*_pk2(y, p, rate), dr]
    return f


# name -> (rhs, y0(p), outputs(y, p) -> dict, state names)
_PK2_ST = ["A_depot", "A_central", "A_periph"]
REF = {
    "pk_3cmt": (_rhs_3cmt, lambda p: [0, 0, 0, 0], lambda y, p: {"C": y[1] / p["V1"]},
                ["A_depot", "A_central", "A_periph1", "A_periph2"]),
    "pk_1cmt_mm": (_rhs_mm, lambda p: [0, 0], lambda y, p: {"C": y[1] / p["V1"]}, ["A_depot", "A_central"]),
    "pk_2cmt_effect": (_rhs_effect, lambda p: [0, 0, 0, 0],
                       lambda y, p: {"C": y[1] / p["V1"],
                                     "E": p["E0"] + p["Emax"] * np.maximum(y[3], 0) ** p["gamma"]
                                     / (p["EC50"] ** p["gamma"] + np.maximum(y[3], 0) ** p["gamma"])},
                       [*_PK2_ST, "Ce"]),
    **{f"pk_2cmt_idr{n}": (_rhs_idr(n), lambda p: [0, 0, 0, p["kin"] / p["kout"]],
                           lambda y, p: {"C": y[1] / p["V1"]}, [*_PK2_ST, "R"]) for n in (1, 2, 3, 4)},
}


def expand(arm: Arm, p: dict) -> list[tuple[float, str, float]]:
    """(time, what, value): what is 'depot' / 'central' (amount) or 'rate' (mg/h change)."""
    ev = []
    for d in arm.doses:
        for i in range(d.count):
            t0 = d.time + i * (d.interval or 0.0)
            if d.route == "oral":
                ev.append((t0, "depot", p["F"] * d.amount))
            elif d.route == "iv_bolus":
                ev.append((t0, "central", d.amount))
            else:
                ev.append((t0, "rate", d.amount / d.duration))
                ev.append((t0 + d.duration, "rate", -d.amount / d.duration))
    return ev


def reference(name: str, p: dict, arm: Arm, times=TIMES) -> dict[str, np.ndarray]:
    """DOP853 restarted at every event; samples at a dose time are taken after the dose."""
    f, y0, outs, states = REF[name]
    ev = expand(arm, p)
    end = float(times[-1])
    cuts = sorted({0.0, end, *(t for t, _, _ in ev if t < end)})
    y = np.array(y0(p), float)
    rate = 0.0
    Y = np.full((len(y), len(times)), np.nan)
    for a, b in zip(cuts, cuts[1:] + [None]):
        for t, what, v in ev:
            if t == a:
                if what == "rate":
                    rate += v
                else:
                    y[1 if what == "central" else 0] += v
        last = b is None
        b = end if last else b
        sel = (times >= a) & ((times <= b) if last else (times < b))
        if b > a:
            te = np.append(times[sel], b)
            sol = solve_ivp(lambda t, yy: f(yy, p, rate), (a, b), y, method="DOP853", t_eval=te,
                            rtol=REF_RTOL, atol=REF_ATOL)
            assert sol.success, sol.message
            Y[:, sel] = sol.y[:, :-1]
            y = sol.y[:, -1].copy()
        else:
            Y[:, sel] = y[:, None]
    res = {s: Y[i] for i, s in enumerate(states)}
    res.update(outs(Y, p))
    return res


def max_rel(got: np.ndarray, ref: np.ndarray) -> float:
    """Relative error where |ref| > 1e-6·max|ref|; elsewhere absolute error over max|ref|."""
    scale = np.abs(ref).max()
    if scale == 0:
        return float(np.abs(got).max())
    big = np.abs(ref) > 1e-6 * scale
    rel = np.abs(got[big] / ref[big] - 1).max(initial=0.0)
    small = np.abs(got[~big] - ref[~big]).max(initial=0.0) / scale
    return float(max(rel, small))


# ---------------------------------------------------------------- kernel vs scipy, every model
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_kernel_matches_scipy(name):
    model = get_model(name)
    assert model.reference and set(model.doses) == {"iv_bolus", "iv_infusion", "oral"}
    assert not {"age", "sex", "weight", "height", "crcl"} & {k.lower() for k in model.parameter_names}
    params = cohort(name)
    arm_idx = np.arange(N) % len(ARMS)
    t0 = time.perf_counter()
    got = run_kernel(name, params, ARMS, arm_idx)
    t1 = time.perf_counter()
    worst = {}
    for i, p in enumerate(params):
        ref = reference(name, p, ARMS[arm_idx[i]])
        assert set(ref) == set(model.observable())
        for k in model.observable():
            assert np.isfinite(got[k][i]).all()
            e = max_rel(got[k][i], ref[k])
            worst[k] = max(worst.get(k, 0.0), e)
            assert e <= TOL, (name, i, ARMS[arm_idx[i]].name, k, e)
    t2 = time.perf_counter()
    print(f"\n{name}: kernel {t1 - t0:.2f}s, scipy {t2 - t1:.2f}s, worst error "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


# ---------------------------------------------------------------- pk_3cmt closed forms
def _k3(p):
    k10, k12, k21 = p["CL"] / p["V1"], p["Q2"] / p["V1"], p["Q2"] / p["V2"]
    k13, k31 = p["Q3"] / p["V1"], p["Q3"] / p["V3"]
    # columns/rows: depot, central, periph1, periph2, [constant 1 carrying the infusion rate]
    return np.array([[-p["ka"], 0, 0, 0],
                     [p["ka"], -(k10 + k12 + k13), k21, k31],
                     [0, k12, -k21, 0],
                     [0, k13, 0, -k31]])


def expm_3cmt(p: dict, arm: Arm, times=TIMES) -> np.ndarray:
    """Central amount by exact propagation y(t+h) = expm(M h) y(t) between events; the infusion
    rate rides along as a constant fifth state (the augmented-matrix form of the input)."""
    ev = expand(arm, p)
    out = np.empty(len(times))
    y = np.zeros(4)
    rate, t = 0.0, 0.0
    pending = sorted(ev, key=lambda e: e[0])
    M = np.zeros((5, 5))
    M[:4, :4] = _k3(p)
    M[1, 4] = 1.0

    cache: dict[float, np.ndarray] = {}

    def step(y, rate, h):
        if h not in cache:
            cache[h] = expm(M * h)
        return (cache[h] @ np.append(y, rate))[:4]

    for j, s in enumerate(times):
        while pending and pending[0][0] <= s:
            te, what, v = pending.pop(0)
            y, t = step(y, rate, te - t), te
            if what == "rate":
                rate += v
            else:
                y[1 if what == "central" else 0] += v
        y, t = step(y, rate, s - t), s
        out[j] = y[1]
    return out / p["V1"]


def test_pk_3cmt_matches_matrix_exponential():
    name = "pk_3cmt"
    params = cohort(name, seed=3)
    arm_idx = np.arange(N) % len(ARMS)
    got = run_kernel(name, params, ARMS, arm_idx)["C"]
    worst = 0.0
    for i, p in enumerate(params):
        e = max_rel(got[i], expm_3cmt(p, ARMS[arm_idx[i]]))
        worst = max(worst, e)
        assert e <= TOL, (i, e)
    print(f"\npk_3cmt vs expm: worst {worst:.1e}")


def test_pk_3cmt_bolus_is_triexponential():
    """Single bolus: C(t) = sum_i c_i exp(-lambda_i t), from the eigen-decomposition of the 3×3
    disposition matrix; three distinct negative real eigenvalues, sum c_i = D / V1."""
    name, D = "pk_3cmt", 100.0
    params = cohort(name, seed=5)
    arm = Arm(name="b", doses=[Dose(amount=D, route="iv_bolus")])
    t = np.linspace(0.0, 96.0, 97)
    got = run_kernel(name, params, [arm], np.zeros(N, int), times=t)["C"]
    worst = 0.0
    for i, p in enumerate(params):
        K = _k3(p)[1:, 1:]
        lam, V = np.linalg.eig(K)
        assert np.isreal(lam).all() and (lam.real < 0).all()
        lam, V = lam.real, V.real
        assert np.min(np.diff(np.sort(lam))) > 0  # three phases
        coef = V[0, :] * np.linalg.solve(V, np.array([D, 0.0, 0.0])) / p["V1"]  # c_i
        assert abs(coef.sum() - D / p["V1"]) <= 1e-12 * D / p["V1"]
        ref = (coef[None, :] * np.exp(lam[None, :] * t[:, None])).sum(axis=1)
        e = max_rel(got[i], ref)
        worst = max(worst, e)
        assert e <= TOL, (i, e)
    print(f"\npk_3cmt vs tri-exponential: worst {worst:.1e}")


# ---------------------------------------------------------------- Michaelis–Menten
def test_mm_bolus_matches_lambert_w():
    """IV bolus, dC/dt = -(Vmax/V) C/(Km+C): Km ln(C/C0) + C - C0 = -(Vmax/V) t, so
    C(t) = Km W((C0/Km) exp((C0 - Vmax t / V) / Km))."""
    name = "pk_1cmt_mm"
    params = cohort(name, seed=9)
    arm = Arm(name="b", doses=[Dose(amount=300.0, route="iv_bolus")])
    t = np.linspace(0.0, 48.0, 97)
    got = run_kernel(name, params, [arm], np.zeros(N, int), times=t)["C"]
    worst = 0.0
    for i, p in enumerate(params):
        c0, km = 300.0 / p["V1"], p["Km"]
        ref = km * lambertw(c0 / km * np.exp((c0 - p["Vmax"] / p["V1"] * t) / km)).real
        e = max_rel(got[i], ref)
        worst = max(worst, e)
        assert e <= TOL, (i, e)
    print(f"\npk_1cmt_mm vs Lambert W: worst {worst:.1e}")


def test_mm_is_linear_when_c_much_below_km():
    """With Km = 1e5 mg/L (C ≤ ~10 mg/L) elimination is first order with CL = Vmax/Km: the
    concentrations match the linear one-compartment closed form to within ~Cmax/Km."""
    km = 1e5
    params = []
    for p in cohort("pk_1cmt_mm", seed=13):
        cl = p["Vmax"] / p["Km"] * 3.0  # a linear clearance of a few L/h
        params.append({**p, "Km": km, "Vmax": cl * km})
    arm_idx = np.arange(N) % len(ARMS)
    got = run_kernel("pk_1cmt_mm", params, ARMS, arm_idx)["C"]
    spec = {"oral": dict(amount=150.0, route="oral", time=0.0, interval=12.0, count=4),
            "bolus": dict(amount=80.0, route="iv_bolus", time=1.3, interval=8.0, count=5),
            "infusion": dict(amount=120.0, route="iv_infusion", time=0.5, interval=12.0, count=3, duration=1.5)}
    for i, p in enumerate(params):
        a = ARMS[arm_idx[i]]
        if a.name == "mixed":
            doses = (expand_regimen(amount=200.0, route="oral")
                     + expand_regimen(amount=40.0, route="iv_bolus", time=6.25)
                     + expand_regimen(amount=60.0, route="iv_infusion", time=5.0, duration=3.0))
        else:
            doses = expand_regimen(**spec[a.name])
        lin = {"CL": p["Vmax"] / p["Km"], "V1": p["V1"], "ka": p["ka"], "F": p["F"]}
        ref = concentration("pk_1cmt", lin, doses, TIMES)
        e = max_rel(got[i], ref)
        assert e <= 5 * ref.max() / km, (i, e)  # deviation is O(C/Km) ...
        assert e > 1e-3 * ref.max() / km  # ... and really is the MM term, not noise


def test_mm_exposure_is_more_than_dose_proportional():
    """Saturable elimination: doubling a dose well above Km·V1 more than doubles the AUC."""
    p = dict(Vmax=20.0, Km=2.0, V1=30.0, ka=1.0, F=1.0)
    arms = [Arm(name=f"d{d:g}", doses=[Dose(amount=d, route="iv_bolus")]) for d in (10.0, 20.0, 400.0, 800.0)]
    t = np.linspace(0.0, 200.0, 4001)
    C = run_kernel("pk_1cmt_mm", [p] * 4, arms, np.arange(4), times=t)["C"]
    auc = np.trapezoid(C, t, axis=1)
    assert 2.0 < auc[1] / auc[0] < 2.2  # C < Km: nearly proportional
    assert auc[3] / auc[2] > 2.5  # C >> Km: clearly supra-proportional
    # at C >> Km elimination is zero order: the amount falls at Vmax
    early = (t > 0.5) & (t < 3.0)
    slope = np.polyfit(t[early], C[3][early] * p["V1"], 1)[0]
    assert slope == pytest.approx(-p["Vmax"] * (800 / 30) / (2 + 800 / 30), rel=0.1)


# ---------------------------------------------------------------- effect compartment
def test_effect_compartment_hysteresis():
    name = "pk_2cmt_effect"
    params = cohort(name, seed=17)
    arm = Arm(name="o", doses=[Dose(amount=200.0, route="oral")])
    t = np.linspace(0.0, 48.0, 961)
    got = run_kernel(name, params, [arm], np.zeros(N, int), times=t)
    for i, p in enumerate(params):
        c, ce, e = got["C"][i], got["Ce"][i], got["E"][i]
        tc, tce, te = t[np.argmax(c)], t[np.argmax(ce)], t[np.argmax(e)]
        assert tce > tc + 0.1, (i, tc, tce)  # the effect site lags the plasma
        assert te == tce  # E is a monotone function of Ce
        # counter-clockwise hysteresis: at the same C, the effect is larger on the falling limb
        level = 0.5 * c.max()
        rise = np.argmax(c >= level)  # first sample at or above half the peak
        fall = np.argmax(c) + np.argmax(c[np.argmax(c):] <= level)  # first at or below it after the peak
        assert e[fall] > e[rise] + 1e-3 * p["Emax"], (i, e[rise], e[fall])
    # ke0 → ∞: Ce follows C
    fast = [{**p, "ke0": 200.0} for p in params[:3]]
    g = run_kernel(name, fast, [arm], np.zeros(3, int), times=t[t <= 12.0])
    assert np.abs(g["Ce"] - g["C"]).max() < 2e-2 * g["C"].max()  # lag ≈ (dC/dt)/ke0


# ---------------------------------------------------------------- indirect response models
IDR = [f"pk_2cmt_idr{n}" for n in (1, 2, 3, 4)]


@pytest.mark.parametrize("name", IDR)
def test_idr_baseline_is_steady_state(name):
    params = cohort(name, seed=21)
    got = run_kernel(name, params, [Arm(name="none")], np.zeros(N, int))
    r0 = np.array([p["kin"] / p["kout"] for p in params])
    assert np.abs(got["R"] / r0[:, None] - 1).max() <= 1e-12
    assert (got["C"] == 0).all()


@pytest.mark.parametrize("name", IDR)
def test_idr_direction_of_effect(name):
    n = int(name[-1])
    params = cohort(name, seed=23)
    arm_idx = np.arange(N) % len(ARMS)
    R = run_kernel(name, params, ARMS, arm_idx)["R"]
    r0 = np.array([p["kin"] / p["kout"] for p in params])[:, None]
    rel = R / r0 - 1
    assert np.abs(rel[:, 0]).max() <= 1e-12  # starts at R0 = kin/kout
    if n in (1, 4):  # less production / more loss: R falls
        assert rel.max() <= 1e-12 and (rel.min(axis=1) < -0.05).all()
    else:  # less loss / more production: R rises
        assert rel.min() >= -1e-12 and (rel.max(axis=1) > 0.05).all()


@pytest.mark.parametrize("name", IDR)
def test_idr_steady_state_under_constant_infusion(name):
    """A 3000 h infusion at rate k: Css = k/CL, and dR/dt = 0 gives R = R0 (1 - I(Css)) [I],
    R0 / (1 - I(Css)) [II], R0 (1 + S(Css)) [III], R0 / (1 + S(Css)) [IV]."""
    n = int(name[-1])
    params = cohort(name, seed=29)
    rate = 20.0
    arm = Arm(name="ss", doses=[Dose(amount=rate * 3000.0, route="iv_infusion", duration=3000.0)])
    got = run_kernel(name, params, [arm], np.zeros(N, int), times=np.array([0.0, 2999.0]))
    for i, p in enumerate(params):
        css = rate / p["CL"]
        r0 = p["kin"] / p["kout"]
        h = _hill(css, p["Imax"] if n <= 2 else p["Emax"], p["IC50"] if n <= 2 else p["EC50"], p["gamma"])
        want = {1: r0 * (1 - h), 2: r0 / (1 - h), 3: r0 * (1 + h), 4: r0 / (1 + h)}[n]
        assert got["C"][i, -1] == pytest.approx(css, rel=1e-8)
        assert got["R"][i, -1] == pytest.approx(want, rel=1e-8), (i, got["R"][i, -1], want)


# ---------------------------------------------------------------- a whole job
def test_pk_3cmt_job_runs(tmp_path, job_file):
    params = "CL = 5.0\nV1 = 20.0\nQ2 = 15.0\nV2 = 40.0\nQ3 = 2.0\nV3 = 150.0\nka = 1.2\nF = 0.7"
    outputs = textwrap.dedent("""
        times = { start = 0.0, stop = 48.0, step = 1.0 }
        variables = ["C", "A_periph2"]
        [[outputs.biomarkers]]
        name = "cmax"
        variable = "C"
        statistic = "max"
    """)
    text = small_job(name="three", model="pk_3cmt", params=params, n=20, chunk=8, outputs=outputs,
                     solver="rtol = 1e-10\natol = 1e-12")
    loaded = load_job(job_file(text))
    assert run(loaded, tmp_path / "run", SerialComm(), quiet=True) == 0
    with h5py.File(tmp_path / "run" / "RUN.h5", "r") as f:
        assert (f["status"][:] == 0).all()
        C, t, arm = f["C"][:], f["time"][:], f["arm"][:]
        names = f["arm"].attrs["flag_meanings"].split()
        par = {k: f["cohort"][k][:] for k in ("CL", "V1", "Q2", "V2", "Q3", "V3", "ka", "F")}
        assert f["A_periph2"].shape == C.shape
    assert C.shape == (20, len(t)) and np.isfinite(C).all()
    # the regimens of tests.helpers.small_job: A oral 100 mg q12h ×4, B 50 mg over 2 h q12h ×4
    regimens = {"A": Arm(name="A", doses=[Dose(amount=100.0, route="oral", interval=12.0, count=4)]),
                "B": Arm(name="B", doses=[Dose(amount=50.0, route="iv_infusion", duration=2.0, interval=12.0,
                                               count=4)])}
    for i in range(C.shape[0]):
        p = {k: float(v[i]) for k, v in par.items()}
        assert max_rel(C[i], expm_3cmt(p, regimens[names[arm[i]]], t)) <= 1e-6
