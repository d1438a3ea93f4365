"""circ_0d, the blood-pressure twin (engine/models/circulation.py).

Reference numbers (default parameters, 60 bpm, after 20 beats, cpu backend, dopri5 rtol 1e-8):
SBP 126.8 / DBP 72.8 mmHg, MAP 100.0, SV 87.9 mL, EF 64.2 %, CO 5.27 L/min; the target is the
127/73 mmHg healthy baseline of the circulation package's Regazzoni2020 defaults, which these
parameters are (its own sharp-valve, cosine-activation equations; no baroreflex).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.integrate import solve_ivp

import engine.models as models
from engine.config import Arm, Dose
from engine.dosing import build_events
from engine.models.circulation import (
    CIRC_0D,
    EVENT_HOOKS,
    _pk_central,
    beat_events,
    beat_lengths_hr,
    circulation_events,
    haemodynamics,
)
from kernels.compile import ode_kernel
from kernels.ode.codegen_numpy import generate
from kernels.ode.integrate_numpy import EVENT_INPUT, EVENT_STATE, Events, SolverOptions

M = CIRC_0D
ROOT = Path(__file__).resolve().parents[1]


def params(m: int = 1, **over) -> np.ndarray:
    """[n_par, m] defaults, with per-name overrides (scalar or [m])."""
    P = np.array([[p.default] * m for p in M.parameters], float)
    for k, v in over.items():
        P[M.parameter_names.index(k)] = v
    return P


def run(P, times, record, backend="cpu", arms=None, arm_idx=None, rtol=1e-8, atol=None, method="dopri5"):
    m = P.shape[1]
    doses = Events.empty(m) if arms is None else build_events(M, arms, np.asarray(arm_idx), P)
    ev = circulation_events(M, P, doses, float(times[-1]))
    opts = SolverOptions(method=method, rtol=rtol, atol=rtol * 1e-2 if atol is None else atol, max_steps=10**8)
    out, st = ode_kernel(M, backend).run(P, ev, np.asarray(times, float), opts, record, np.zeros(m, np.int8))
    assert (st == 0).all(), st
    return {r: out[i] for i, r in enumerate(record)}


def last_beats(t_end: float, n: float = 1.0, dt: float = 1e-3) -> np.ndarray:
    """Sample times covering the last n seconds up to t_end (dense enough for max/min)."""
    k = int(round(n / dt))
    return t_end - n + dt * np.arange(k + 1)


# ---------------------------------------------------------------- declaration and beat events
def test_registered_and_hooked():
    assert models.get_model("circ_0d") is M
    assert EVENT_HOOKS["circ_0d"] is circulation_events
    assert set(M.doses) == {"oral", "iv_bolus", "oral_bb", "iv_bolus_bb"}
    assert len(M.states) == 17 and M.input_names == ["dT_beat"] and M.time_unit == "s"


def test_beat_events_schedule_and_why_they_are_needed():
    hr = np.array([60.0, 75.0, 50.0])
    P = params(3, HR=hr)
    ev = beat_events(M, P, 10.0)
    tau = M.state_names.index("tau")
    for j, h in enumerate(hr):
        T = 60.0 / h
        n = int(np.floor(10.0 / T + 1e-9))
        got = ev.time[:, j][np.isfinite(ev.time[:, j])]
        np.testing.assert_allclose(got, T * np.arange(1, n + 1), rtol=0, atol=1e-12)
        assert (ev.kind[:n, j] == EVENT_STATE).all() and (ev.target[:n, j] == tau).all()
        np.testing.assert_allclose(ev.value[:n, j], -T, rtol=1e-14)
    # merged with doses: per patient in time order, the dose first at equal times
    doses = build_events(M, [Arm(name="a", doses=[Dose(amount=5.0, route="iv_bolus", time=2.0)])], np.zeros(3), P)
    allev = circulation_events(M, P, doses, 10.0)
    fin = np.isfinite(allev.time)
    assert fin.sum(axis=0).tolist() == [11, 13, 9]  # beats in 10 s at 60, 75, 50 bpm, plus the dose
    assert all((np.diff(allev.time[fin[:, j], j]) >= 0).all() for j in range(3))
    j = 0
    at2 = np.nonzero(allev.time[:, j] == 2.0)[0]
    assert allev.target[at2[0], j] == M.state_names.index("A_c_vd") and allev.target[at2[1], j] == tau
    # without beat events tau keeps growing: after the first beat the heart stops contracting
    P1 = params(1)
    out, st = ode_kernel(M, "cpu").run(P1, Events.empty(1), np.linspace(0, 3, 31), SolverOptions(rtol=1e-6, atol=1e-8),
                                       ["beat_phase"], np.zeros(1, np.int8))
    assert out[0].max() > 2.5


# ---------------------------------------------------------------- (a) volume conservation
@pytest.mark.parametrize("backend", ["cpu", pytest.param("numpy", marks=pytest.mark.slow)])
def test_total_volume_conserved_20_beats(backend):
    """sum of chamber volumes + C p of the four compartments: a linear invariant of the ODE, kept by
    the Runge-Kutta stages up to round-off. Patients: defaults; changed resistances/compliances and
    HR 72; vasodilator + beta-blocker doses (state and input events every beat)."""
    m = 3
    P = params(m, R_AR_SYS=[0.8, 1.1, 0.8], C_AR_SYS=[1.2, 0.9, 1.2], C_VEN_SYS=[130.0, 100.0, 130.0],
               R_VEN_SYS=[0.26, 0.35, 0.26], HR=[60.0, 72.0, 60.0], V_blood=[5125.0, 4800.0, 5125.0])
    arms = [Arm(name="none"), Arm(name="both", doses=[Dose(amount=10.0, route="iv_bolus"),
                                                       Dose(amount=100.0, route="iv_bolus_bb")])]
    times = np.arange(0, 2001) * 0.01  # 20 s = 20 beats at 60 bpm (24 at 72)
    out = run(P, times, ["V_total", "beat_phase", "HR_eff"], backend, arms, [0, 0, 1], rtol=1e-6)
    V = out["V_total"]
    np.testing.assert_allclose(V[:, 0], P[M.parameter_names.index("V_blood")], rtol=1e-13)
    drift = np.abs(V / V[:, :1] - 1).max()
    assert drift <= 1e-9, drift
    assert out["beat_phase"].min() >= 0 and out["beat_phase"].max() <= 1 + 1e-9  # round-off at a beat end
    assert out["HR_eff"][2, -1] < 50  # the beta-blocker patient's beats did change length


# ---------------------------------------------------------------- (b) healthy baseline
def test_healthy_baseline_after_20_beats():
    t = last_beats(20.0, 1.0)
    out = run(params(1), t, ["p_AR_SYS", "V_LV", "HR_eff"])
    h = {k: float(v[0]) for k, v in haemodynamics(t, out["p_AR_SYS"], out["V_LV"], out["HR_eff"]).items()}
    # 127/73 +- 2 mmHg (measured 126.8/72.8); physiological ranges for the rest
    assert abs(h["SBP"] - 127.0) <= 2.0 and abs(h["DBP"] - 73.0) <= 2.0, h
    assert 90 <= h["MAP"] <= 105, h
    assert 60 <= h["SV"] <= 100 and 50 <= h["EF"] <= 70 and 4 <= h["CO"] <= 7, h
    # periodic: the beat before gives the same numbers to 0.1 mmHg / 0.1 mL
    t19 = last_beats(19.0, 1.0)
    o19 = run(params(1), t19, ["p_AR_SYS", "V_LV"])
    h19 = haemodynamics(t19, o19["p_AR_SYS"], o19["V_LV"], 60.0)
    for k in ("SBP", "DBP", "SV"):
        assert abs(h19[k][0] - h[k]) < 0.1, (k, h19[k][0], h[k])


# ---------------------------------------------------------------- (c) against SciPy
def _scipy_rhs(d):
    """The equations transcribed independently, with t mod T instead of the beat events."""
    TH = 60.0 / d["HR"]

    def act(t, c):
        x = np.mod(t, TH) / TH
        tC, TC, TR = d[f"tC_{c}"], d[f"TC_{c}"], d[f"TR_{c}"]
        wc, wr = np.mod(x - tC, 1.0), np.mod(x - tC - TC, 1.0)
        if wc < TC:
            return 0.5 * (1 - np.cos(np.pi * wc / TC))
        if wr < TR:
            return 0.5 * (1 + np.cos(np.pi * wr / TR))
        return 0.0

    def pc(t, V, c):
        return (d[f"EB_{c}"] + d[f"EA_{c}"] * act(t, c)) * (V - d[f"V0_{c}"])

    def Q(a, b):
        return (a - b) / (d["R_min"] if a > b else d["R_max"])

    def f(t, y):
        VLA, VLV, VRA, VRV, pAS, pVS, pAP, pVP, QAS, QVS, QAP, QVP = y
        pLA, pLV, pRA, pRV = pc(t, VLA, "LA"), pc(t, VLV, "LV"), pc(t, VRA, "RA"), pc(t, VRV, "RV")
        QMV, QAV, QTV, QPV = Q(pLA, pLV), Q(pLV, pAS), Q(pRA, pRV), Q(pRV, pAP)
        return [QVP - QMV, QMV - QAV, QVS - QTV, QTV - QPV,
                (QAV - QAS) / d["C_AR_SYS"], (QAS - QVS) / d["C_VEN_SYS"],
                (QPV - QAP) / d["C_AR_PUL"], (QAP - QVP) / d["C_VEN_PUL"],
                -(d["R_AR_SYS"] * QAS + pVS - pAS) / d["L_AR_SYS"], -(d["R_VEN_SYS"] * QVS + pRA - pVS) / d["L_VEN_SYS"],
                -(d["R_AR_PUL"] * QAP + pVP - pAP) / d["L_AR_PUL"], -(d["R_VEN_PUL"] * QVP + pLA - pVP) / d["L_VEN_PUL"]]

    return f


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_one_beat_against_scipy_radau(backend):
    """One beat from the default initial state vs SciPy Radau (rtol 1e-10), componentwise error
    relative to each state's largest magnitude over the beat: <= 1e-6.

    The valves make the right-hand side only piecewise smooth (the slope of Q against the pressure
    difference jumps by R_max/R_min ~ 1e7 at every opening and closing, and the activation is C1),
    so no method keeps its order across a switch: Radau at rtol 1e-10 and DOP853 at rtol 1e-13 agree
    to 1.2e-9, and dopri5's global error is ~100x its rtol (9.6e-7 at 1e-8, 2e-8 at 1e-10). rtol 1e-9
    leaves a factor ~10 of margin under 1e-6."""
    d = M.defaults()
    TH = 60.0 / d["HR"]
    y0 = generate(M).init(params(1))[:12, 0]
    tt = np.linspace(0.0, TH, 201)
    ref = solve_ivp(_scipy_rhs(d), (0.0, TH), y0, method="Radau", rtol=1e-10, atol=1e-12, t_eval=tt)
    assert ref.status == 0
    names = M.state_names[:12]
    out = run(params(1), tt, names, backend, rtol=1e-9, atol=1e-11)
    got = np.array([out[n][0] for n in names])
    err = (np.abs(got - ref.y).max(axis=1) / np.abs(ref.y).max(axis=1)).max()
    assert err <= 1e-6, err


# ---------------------------------------------------------------- (d) drug arms
def test_vasodilator_lowers_map_monotonically_with_dose():
    """IV bolus: the concentration is ~constant over the 30 simulated beats (t1/2 ~ 42 h), so this is
    the blood pressure at a clamped concentration, dose by dose."""
    doses = [0.0, 2.5, 5.0, 10.0, 20.0, 40.0]
    arms = [Arm(name=f"d{i}", doses=[Dose(amount=a, route="iv_bolus")] if a else []) for i, a in enumerate(doses)]
    m = len(doses)
    P = params(m)
    t = last_beats(30.0, 1.0)
    out = run(P, t, ["p_AR_SYS", "V_LV", "C_vd", "R_SYS"], arms=arms, arm_idx=np.arange(m))
    h = haemodynamics(t, out["p_AR_SYS"], out["V_LV"], 60.0)
    assert (np.diff(h["MAP"]) < 0).all() and (np.diff(h["SBP"]) < 0).all() and (np.diff(h["DBP"]) < 0).all(), h
    assert h["MAP"][0] - h["MAP"][3] > 5.0  # 10 mg: about -11 mmHg
    # PK and Emax as declared (ke t = 30 s * 25/1500/3600 is 1.4e-4: nearly the initial concentration)
    d = M.defaults()
    C0 = 1000 * np.array(doses) / d["V_vd"]
    C = out["C_vd"][:, -1]
    np.testing.assert_allclose(C, C0 * np.exp(-d["CL_vd"] / d["V_vd"] / 3600 * t[-1]), rtol=1e-6)
    np.testing.assert_allclose(out["R_SYS"][:, -1], d["R_AR_SYS"] * (1 - d["Emax_vd"] * C / (d["EC50_vd"] + C)),
                               rtol=1e-12)


def test_oral_vasodilator_over_an_hour():
    """Oral route: absorption over an hour of beats (3600 beat events); MAP falls with dose and the
    kernel's concentration is the closed-form Bateman value."""
    arms = [Arm(name="pbo"), Arm(name="vd10", doses=[Dose(amount=10.0, route="oral")]),
            Arm(name="vd20", doses=[Dose(amount=20.0, route="oral")])]
    P = params(3)
    t = last_beats(3600.0, 1.0, dt=2e-3)
    out = run(P, t, ["p_AR_SYS", "V_LV", "C_vd", "A_c_vd"], arms=arms, arm_idx=np.arange(3), rtol=1e-7)
    h = haemodynamics(t, out["p_AR_SYS"], out["V_LV"], 60.0)
    assert (np.diff(h["MAP"]) < -1.0).all(), h["MAP"]
    pr = {n: P[i] for i, n in enumerate(M.parameter_names)}
    ev = build_events(M, arms, np.arange(3), P)
    A = _pk_central(pr, "vd", ev, M, np.full(3, t[-1]))
    np.testing.assert_allclose(out["A_c_vd"][:, -1], A, rtol=1e-6, atol=1e-12)


def test_beta_blocker_slows_the_heart_beat_by_beat():
    """Beta-blocker: each beat's length is 60 / HR(C_bb at the beat's start); the beat events get
    C_bb from the closed-form PK and the kernel integrates the same PK, so they must agree."""
    arms = [Arm(name="pbo"), Arm(name="bb50", doses=[Dose(amount=50.0, route="oral_bb")]),
            Arm(name="bb100", doses=[Dose(amount=100.0, route="oral_bb")]),
            Arm(name="bb_iv", doses=[Dose(amount=100.0, route="iv_bolus_bb")])]
    m = 4
    P = params(m)
    t_end = 600.0
    t = last_beats(t_end - 0.3, 2.0)  # the last 2 s before t_end - 0.3 (mid-beat for every patient)
    out = run(P, t, ["p_AR_SYS", "V_LV", "HR_eff", "C_bb", "A_c_bb", "V_total", "beat_phase"], arms=arms,
              arm_idx=np.arange(m), rtol=1e-7)
    doses = build_events(M, arms, np.arange(m), P)
    ev = beat_events(M, P, t[-1], doses)
    # beat starts from the events; the kernel's HR_eff at t[-1] is the HR at the last beat's start
    last_start = np.array([ev.time[:, j][np.isfinite(ev.time[:, j]) & (ev.target[:, j] == M.state_names.index("tau"))
                                         & (ev.kind[:, j] == EVENT_STATE)].max() for j in range(m)])
    np.testing.assert_allclose(out["HR_eff"][:, -1], beat_lengths_hr(M, P, last_start, doses), rtol=1e-12)
    # the hook's closed-form PK and the kernel's integrated PK agree
    pr = {n: P[i] for i, n in enumerate(M.parameter_names)}
    np.testing.assert_allclose(out["A_c_bb"][:, -1], _pk_central(pr, "bb", doses, M, np.full(m, t[-1])),
                               rtol=1e-6, atol=1e-12)
    hr = out["HR_eff"][:, -1]
    assert hr[0] == 60.0 and hr[0] > hr[1] > hr[2] and hr[3] < 50, hr
    h = haemodynamics(t, out["p_AR_SYS"], out["V_LV"], out["HR_eff"])
    assert h["MAP"][0] > h["MAP"][1] > h["MAP"][2] > h["MAP"][3], h["MAP"]
    assert np.abs(out["V_total"] / P[M.parameter_names.index("V_blood")][:, None] - 1).max() < 1e-9
    assert 0 <= out["beat_phase"].min() and out["beat_phase"].max() <= 1 + 1e-9  # round-off at a beat end
    # input events (beat-length changes) exist only for the beta-blocker patients
    inp = (ev.kind == EVENT_INPUT) & np.isfinite(ev.time)
    assert not inp[:, 0].any() and inp[:, 1:].any(axis=0).all()


# ---------------------------------------------------------------- (e) cohort variability
def test_lognormal_variability_spreads_blood_pressure():
    m = 64
    rng = np.random.default_rng(2022)
    names = ["R_AR_SYS", "C_AR_SYS", "R_VEN_SYS", "C_VEN_SYS", "C_AR_PUL", "C_VEN_PUL"]
    d = M.defaults()
    over = {n: d[n] * np.exp(rng.normal(0.0, 0.2, m)) for n in names}  # omega = 0.04 (CV ~ 20 %)
    P = params(m, **over)
    t = last_beats(30.0, 1.0, dt=2e-3)
    out = run(P, t, ["p_AR_SYS", "V_LV"], rtol=1e-7)
    h = haemodynamics(t, out["p_AR_SYS"], out["V_LV"], 60.0)
    sbp = h["SBP"]
    assert np.isfinite(sbp).all()
    assert sbp.std() > 5.0 and np.percentile(sbp, 95) - np.percentile(sbp, 5) > 15.0, sbp
    # more resistance -> higher pressure; stiffer arteries (lower compliance) -> wider pulse pressure
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert np.corrcoef(rank(over["R_AR_SYS"]), rank(h["MAP"]))[0, 1] > 0.5
    assert np.corrcoef(rank(over["C_AR_SYS"]), rank(h["PP"]))[0, 1] < -0.3
    assert ((h["EF"] > 30) & (h["EF"] < 85)).all()


# ---------------------------------------------------------------- through the job path (needs the runner hook)
@pytest.mark.slow
@pytest.mark.skipif(not hasattr(models, "EVENT_HOOKS"), reason="runner does not apply model event hooks yet")
def test_bp_example_job_end_to_end(tmp_path):
    from engine.analysis import open_run

    job = ROOT / "jobs" / "bp_example.toml"
    out = tmp_path / "bp"
    p = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(job), "-o", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.returncode == 0, p.stderr
    assert "0 failed" in p.stderr
    r = open_run(out)
    arm = r["arm"].values
    sbp, mapv = r["sbp"].values, r["map"].values
    assert abs(np.median(sbp[arm == 0]) - 127.0) < 5.0
    assert np.median(mapv[arm == 0]) - np.median(mapv[arm == 1]) > 5.0
    # screened-out patients (the example's [trial] inclusion) are not simulated: NaN outputs
    ok = r["status"].values == 0
    assert (arm[~ok] == -1).all() and ok.sum() > 350
    assert r["beat_phase"].values[ok].max() <= 1.0 + 1e-9
