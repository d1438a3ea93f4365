"""Blood-pressure twin: closed-loop 0-D circulation of Regazzoni et al. (2022) with antihypertensive PK/PD.

``circ_0d``: four heart chambers with time-varying elastance, four non-ideal valves, and RLC
compartments for the systemic and pulmonary arteries and veins (Regazzoni, Salvador, Africa, Fedele,
Dede', Quarteroni, J Comput Phys 457:111083, 2022, section 2.2 / appendix; arXiv:2011.15040).
Units: volume mL, pressure mmHg, flow mL/s, time s (resistance mmHg·s/mL, compliance mL/mmHg,
inertance mmHg·s²/mL, elastance mmHg/mL).

Chambers (X = LA, LV, RA, RV), with p_ex = 0:
    p_X = E_X(t) (V_X - V0_X),   E_X(t) = EB_X + EA_X e_X(t)
    e_X = (1 - cos(pi w_C / TC_X)) / 2   for 0 <= w_C < TC_X,  w_C = (x - tC_X) mod 1   (contraction)
        = (1 + cos(pi w_R / TR_X)) / 2   for 0 <= w_R < TR_X,  w_R = (x - tC_X - TC_X) mod 1 (relaxation)
        = 0                              otherwise
  x = tau / T_hb in [0, 1) is the position in the current beat: the state tau (d tau/dt = 1) is
  set back by the beat length at the end of every beat by an event (`beat_events`), which makes
  "t mod T_hb" exact without a modulo function. The activation times tC, TC, TR are fractions of
  the beat, as in Regazzoni's own circulation code (times scale with the heart period); at the
  default 60 bpm they equal the circulation package's values in seconds.
Valves (MV: LA->LV, AV: LV->AR_SYS, TV: RA->RV, PV: RV->AR_PUL), non-ideal diodes:
    Q = (p_up - p_down) / R,   R = R_min if p_up > p_down else R_max
  (the paper's sharp switch; Q is continuous in the pressure difference, its slope jumps).
Compartments:
    dV_LA/dt = Q_VEN_PUL - Q_MV      dV_LV/dt = Q_MV - Q_AV
    dV_RA/dt = Q_VEN_SYS - Q_TV      dV_RV/dt = Q_TV - Q_PV
    C_AR_SYS dp_AR_SYS/dt = Q_AV - Q_AR_SYS         C_VEN_SYS dp_VEN_SYS/dt = Q_AR_SYS - Q_VEN_SYS
    C_AR_PUL dp_AR_PUL/dt = Q_PV - Q_AR_PUL         C_VEN_PUL dp_VEN_PUL/dt = Q_AR_PUL - Q_VEN_PUL
    L_AR_SYS dQ_AR_SYS/dt = -R_SYS Q_AR_SYS - (p_VEN_SYS - p_AR_SYS)
    L_VEN_SYS dQ_VEN_SYS/dt = -R_VEN_SYS Q_VEN_SYS - (p_RA - p_VEN_SYS)
    L_AR_PUL dQ_AR_PUL/dt = -R_AR_PUL Q_AR_PUL - (p_VEN_PUL - p_AR_PUL)
    L_VEN_PUL dQ_VEN_PUL/dt = -R_VEN_PUL Q_VEN_PUL - (p_LA - p_VEN_PUL)
  The total volume V_LA + V_LV + V_RA + V_RV + sum C p is a linear invariant (exactly conserved
  by Runge-Kutta and Rosenbrock methods up to round-off).

Default parameters are those of the `circulation` package's Regazzoni2020 model
(H. Finsberg, github.com/ComputationalPhysiology/circulation, MIT licence, src/circulation/regazzoni2020.py),
which takes the elastances, valve resistances, R/C/L values and activation fractions of Regazzoni's
own 0-D code (circulation_closed_loop, arXiv:2011.15040) with HR 60 bpm (72 there) and C_VEN_SYS
130 mL/mmHg (60 there), and its initial state (total volume 5125 mL). They give a healthy periodic
state of 126.8/72.8 mmHg, SV 88 mL, EF 64 %, CO 5.3 L/min (tests/test_circulation.py). The 2022
paper's table, as two independent open implementations transcribe it, has 75 bpm, C_VEN_SYS 60
and absolute activation times (LA tC/TC/TR 0.6/0.104/0.68 s, RA 0.56/0.064/0.64 s, ventricles
0/0.272/0.12 s); with those values this model gives about 123/78 mmHg, SV 71 mL, EF 60 %.
No baroreflex: blood pressure follows resistance and compliance changes without compensation.

Antihypertensive PK/PD (illustrative, not fitted; PK parameters in hours, converted to seconds):
* vasodilator ("vd", amlodipine-like), routes ``oral`` (F_vd into A_gut_vd) and ``iv_bolus``
  (into A_c_vd): one compartment, first-order absorption; C_vd = 1000 A_c_vd / V_vd (ng/mL);
  R_SYS = R_AR_SYS (1 - Emax_vd C^g / (EC50_vd^g + C^g)).
* beta-blocker ("bb", metoprolol-like), routes ``oral_bb`` and ``iv_bolus_bb``, same PK form;
  it lowers the heart rate, HR_k = HR (1 - Emax_bb C_bb^g / (EC50_bb^g + C_bb^g)) with C_bb taken
  at the start of beat k. Beat lengths are decided between beats, so `beat_events` computes them
  from the dose events with the closed-form linear PK (the same equations the kernel integrates)
  and hands the kernel each beat's length through the input dT_beat (T_hb = 60/HR + dT_beat).

Beat events are not doses: a job's arms cannot make them. The runner must merge them into each
chunk's events with `circulation_events` (EVENT_HOOKS below) before calling the kernel.
"""

from __future__ import annotations

import numpy as np

from kernels.ode.integrate_numpy import EVENT_INPUT, EVENT_STATE, Events
from kernels.ode.model import BolusTarget, Input, Model, Output, Parameter, State

_P = Parameter

# ---------------------------------------------------------------- parameters
_CHAMBERS = {  # EA (active), EB (passive) mmHg/mL; V0 mL; tC, TC, TR fractions of the beat
    "LA": (0.07, 0.09, 4.0, 0.80, 0.17, 0.17),
    "LV": (2.75, 0.08, 5.0, 0.00, 0.34, 0.17),
    "RA": (0.06, 0.07, 4.0, 0.80, 0.17, 0.17),
    "RV": (0.55, 0.05, 10.0, 0.00, 0.34, 0.17),
}
_NAMES = {"LA": "left atrium", "LV": "left ventricle", "RA": "right atrium", "RV": "right ventricle"}

_PARAMS = [_P("HR", 60.0, "1/min", "heart rate without drug (beat period 60/HR s)")]
for _c, (_ea, _eb, _v0, _tc, _TC, _TR) in _CHAMBERS.items():
    _PARAMS += [
        _P(f"EA_{_c}", _ea, "mmHg/mL", f"{_NAMES[_c]}: maximal active elastance"),
        _P(f"EB_{_c}", _eb, "mmHg/mL", f"{_NAMES[_c]}: passive elastance"),
        _P(f"V0_{_c}", _v0, "mL", f"{_NAMES[_c]}: unstressed volume"),
        _P(f"tC_{_c}", _tc, "1", f"{_NAMES[_c]}: start of contraction, fraction of the beat (in [0, 1))",
           positive=False),
        _P(f"TC_{_c}", _TC, "1", f"{_NAMES[_c]}: duration of contraction, fraction of the beat"),
        _P(f"TR_{_c}", _TR, "1", f"{_NAMES[_c]}: duration of relaxation, fraction of the beat (TC + TR <= 1)"),
    ]
_PARAMS += [
    _P("R_min", 0.0075, "mmHg*s/mL", "valve resistance, open"),
    _P("R_max", 75006.2, "mmHg*s/mL", "valve resistance, closed"),
    _P("R_AR_SYS", 0.8, "mmHg*s/mL", "systemic arterial resistance (without drug)"),
    _P("C_AR_SYS", 1.2, "mL/mmHg", "systemic arterial compliance"),
    _P("L_AR_SYS", 5e-3, "mmHg*s^2/mL", "systemic arterial inertance"),
    _P("R_VEN_SYS", 0.26, "mmHg*s/mL", "systemic venous resistance"),
    _P("C_VEN_SYS", 130.0, "mL/mmHg", "systemic venous compliance"),
    _P("L_VEN_SYS", 5e-4, "mmHg*s^2/mL", "systemic venous inertance"),
    _P("R_AR_PUL", 0.1625, "mmHg*s/mL", "pulmonary arterial resistance"),
    _P("C_AR_PUL", 10.0, "mL/mmHg", "pulmonary arterial compliance"),
    _P("L_AR_PUL", 5e-4, "mmHg*s^2/mL", "pulmonary arterial inertance"),
    _P("R_VEN_PUL", 0.1625, "mmHg*s/mL", "pulmonary venous resistance"),
    _P("C_VEN_PUL", 16.0, "mL/mmHg", "pulmonary venous compliance"),
    _P("L_VEN_PUL", 5e-4, "mmHg*s^2/mL", "pulmonary venous inertance"),
    _P("V_blood", 5125.0, "mL", "total blood volume in the loop (sets the initial systemic venous pressure)"),
    # vasodilator (amlodipine-like, illustrative)
    _P("ka_vd", 0.4, "1/h", "vasodilator: first-order absorption rate"),
    _P("F_vd", 0.64, "1", "vasodilator: oral bioavailability"),
    _P("CL_vd", 25.0, "L/h", "vasodilator: clearance"),
    _P("V_vd", 1500.0, "L", "vasodilator: volume of distribution"),
    _P("Emax_vd", 0.35, "1", "vasodilator: maximal fractional reduction of R_AR_SYS (< 1)", positive=False),
    _P("EC50_vd", 8.0, "ng/mL", "vasodilator: concentration at half-maximal effect"),
    _P("gamma_vd", 1.0, "1", "vasodilator: Hill coefficient"),
    # beta-blocker (metoprolol-like, illustrative)
    _P("ka_bb", 1.5, "1/h", "beta-blocker: first-order absorption rate"),
    _P("F_bb", 0.5, "1", "beta-blocker: oral bioavailability"),
    _P("CL_bb", 60.0, "L/h", "beta-blocker: clearance"),
    _P("V_bb", 290.0, "L", "beta-blocker: volume of distribution"),
    _P("Emax_bb", 0.3, "1", "beta-blocker: maximal fractional reduction of the heart rate (< 1)", positive=False),
    _P("EC50_bb", 100.0, "ng/mL", "beta-blocker: concentration at half-maximal effect"),
    _P("gamma_bb", 1.0, "1", "beta-blocker: Hill coefficient"),
]

# initial state: the circulation package's Regazzoni2020 default, with p_VEN_SYS set from V_blood
_INIT = {"V_LA": 65.0, "V_LV": 120.0, "V_RA": 65.0, "V_RV": 145.0,
         "p_AR_SYS": 80.0, "p_AR_PUL": 35.0, "p_VEN_PUL": 24.0}
_P_VEN_SYS0 = ("(V_blood - ({V_LA} + {V_LV} + {V_RA} + {V_RV}) - C_AR_SYS * {p_AR_SYS} - C_AR_PUL * {p_AR_PUL}"
               " - C_VEN_PUL * {p_VEN_PUL}) / C_VEN_SYS").format(**_INIT)

_STATES = [
    State("V_LA", _INIT["V_LA"], "mL", "left atrial volume"),
    State("V_LV", _INIT["V_LV"], "mL", "left ventricular volume"),
    State("V_RA", _INIT["V_RA"], "mL", "right atrial volume"),
    State("V_RV", _INIT["V_RV"], "mL", "right ventricular volume"),
    State("p_AR_SYS", _INIT["p_AR_SYS"], "mmHg", "systemic arterial pressure"),
    State("p_VEN_SYS", _P_VEN_SYS0, "mmHg", "systemic venous pressure"),
    State("p_AR_PUL", _INIT["p_AR_PUL"], "mmHg", "pulmonary arterial pressure"),
    State("p_VEN_PUL", _INIT["p_VEN_PUL"], "mmHg", "pulmonary venous pressure"),
    State("Q_AR_SYS", 0.0, "mL/s", "systemic arterial flow"),
    State("Q_VEN_SYS", 0.0, "mL/s", "systemic venous flow (into RA)"),
    State("Q_AR_PUL", 0.0, "mL/s", "pulmonary arterial flow"),
    State("Q_VEN_PUL", 0.0, "mL/s", "pulmonary venous flow (into LA)"),
    State("tau", 0.0, "s", "time since the start of the current beat (reset by beat events)"),
    State("A_gut_vd", 0.0, "mg", "vasodilator at the absorption site"),
    State("A_c_vd", 0.0, "mg", "vasodilator in the central compartment"),
    State("A_gut_bb", 0.0, "mg", "beta-blocker at the absorption site"),
    State("A_c_bb", 0.0, "mg", "beta-blocker in the central compartment"),
]


def _activation(c: str) -> list[tuple[str, str]]:
    """e_X in [0, 1] at beat position x_b: contraction and relaxation windows taken modulo 1."""
    tr = f"(tC_{c} + TC_{c})"
    return [
        (f"dc_{c}", f"x_b - tC_{c}"),
        (f"wc_{c}", f"ifelse(dc_{c} < 0, dc_{c} + 1, dc_{c})"),
        (f"dr_{c}", f"x_b - {tr}"),
        (f"dr1_{c}", f"ifelse(dr_{c} < 0, dr_{c} + 1, dr_{c})"),  # tC + TC may exceed 1: wrap twice
        (f"wr_{c}", f"ifelse(dr1_{c} < 0, dr1_{c} + 1, dr1_{c})"),
        (f"e_{c}", f"ifelse(wc_{c} < TC_{c}, 0.5 * (1 - cos(pi * wc_{c} / TC_{c})), "
                   f"ifelse(wr_{c} < TR_{c}, 0.5 * (1 + cos(pi * wr_{c} / TR_{c})), 0))"),
        (f"p_{c}", f"(EB_{c} + EA_{c} * e_{c}) * (V_{c} - V0_{c})"),
    ]


def _valve(name: str, up: str, down: str) -> tuple[str, str]:
    return (f"Q_{name}", f"({up} - {down}) / ifelse({up} > {down}, R_min, R_max)")


def _emax(c: str, d: str) -> str:
    return f"Emax_{d} * max({c}, 0)**gamma_{d} / (EC50_{d}**gamma_{d} + max({c}, 0)**gamma_{d})"


_EXPRESSIONS = [
    ("T_hb", "60 / HR + dT_beat"),
    ("x_b", "max(tau, 0) / T_hb"),
    ("C_vd", "1000 * A_c_vd / V_vd"),
    ("C_bb", "1000 * A_c_bb / V_bb"),
    ("R_SYS", f"R_AR_SYS * (1 - {_emax('C_vd', 'vd')})"),
    *[e for c in _CHAMBERS for e in _activation(c)],
    _valve("MV", "p_LA", "p_LV"),
    _valve("AV", "p_LV", "p_AR_SYS"),
    _valve("TV", "p_RA", "p_RV"),
    _valve("PV", "p_RV", "p_AR_PUL"),
]

_DERIVATIVES = {
    "V_LA": "Q_VEN_PUL - Q_MV",
    "V_LV": "Q_MV - Q_AV",
    "V_RA": "Q_VEN_SYS - Q_TV",
    "V_RV": "Q_TV - Q_PV",
    "p_AR_SYS": "(Q_AV - Q_AR_SYS) / C_AR_SYS",
    "p_VEN_SYS": "(Q_AR_SYS - Q_VEN_SYS) / C_VEN_SYS",
    "p_AR_PUL": "(Q_PV - Q_AR_PUL) / C_AR_PUL",
    "p_VEN_PUL": "(Q_AR_PUL - Q_VEN_PUL) / C_VEN_PUL",
    "Q_AR_SYS": "-(R_SYS * Q_AR_SYS + p_VEN_SYS - p_AR_SYS) / L_AR_SYS",
    "Q_VEN_SYS": "-(R_VEN_SYS * Q_VEN_SYS + p_RA - p_VEN_SYS) / L_VEN_SYS",
    "Q_AR_PUL": "-(R_AR_PUL * Q_AR_PUL + p_VEN_PUL - p_AR_PUL) / L_AR_PUL",
    "Q_VEN_PUL": "-(R_VEN_PUL * Q_VEN_PUL + p_LA - p_VEN_PUL) / L_VEN_PUL",
    "tau": "1",
    "A_gut_vd": "-ka_vd / 3600 * A_gut_vd",
    "A_c_vd": "ka_vd / 3600 * A_gut_vd - CL_vd / V_vd / 3600 * A_c_vd",
    "A_gut_bb": "-ka_bb / 3600 * A_gut_bb",
    "A_c_bb": "ka_bb / 3600 * A_gut_bb - CL_bb / V_bb / 3600 * A_c_bb",
}

_V_TOTAL = ("V_LA + V_LV + V_RA + V_RV + C_AR_SYS * p_AR_SYS + C_VEN_SYS * p_VEN_SYS"
            " + C_AR_PUL * p_AR_PUL + C_VEN_PUL * p_VEN_PUL")

_OUTPUTS = [
    Output("p_LA", "p_LA", "mmHg", "left atrial pressure"),
    Output("p_LV", "p_LV", "mmHg", "left ventricular pressure"),
    Output("p_RA", "p_RA", "mmHg", "right atrial pressure"),
    Output("p_RV", "p_RV", "mmHg", "right ventricular pressure"),
    Output("Q_MV", "Q_MV", "mL/s", "mitral valve flow"),
    Output("Q_AV", "Q_AV", "mL/s", "aortic valve flow"),
    Output("Q_TV", "Q_TV", "mL/s", "tricuspid valve flow"),
    Output("Q_PV", "Q_PV", "mL/s", "pulmonary valve flow"),
    Output("V_total", _V_TOTAL, "mL", "total blood volume (chambers + compartments), conserved"),
    Output("E_LV", "EB_LV + EA_LV * e_LV", "mmHg/mL", "left ventricular elastance"),
    Output("C_vd", "C_vd", "ng/mL", "vasodilator plasma concentration"),
    Output("C_bb", "C_bb", "ng/mL", "beta-blocker plasma concentration"),
    Output("R_SYS", "R_SYS", "mmHg*s/mL", "effective systemic arterial resistance (with drug)"),
    Output("HR_eff", "60 / T_hb", "1/min", "heart rate of the current beat (with drug)"),
    Output("beat_phase", "x_b", "1", "position in the current beat: in [0, 1] (up to round-off) when beat events are applied"),
]

CIRC_0D = Model(
    name="circ_0d",
    description="Closed-loop 0-D circulation (time-varying elastance heart, non-ideal valves, systemic and "
                "pulmonary RLC compartments) with vasodilator and beta-blocker PK/PD",
    time_unit="s",
    states=_STATES,
    parameters=_PARAMS,
    inputs=[Input("dT_beat", "s")],
    expressions=_EXPRESSIONS,
    derivatives=_DERIVATIVES,
    outputs=_OUTPUTS,
    doses={
        "oral": BolusTarget("A_gut_vd", fraction="F_vd"),
        "iv_bolus": BolusTarget("A_c_vd"),
        "oral_bb": BolusTarget("A_gut_bb", fraction="F_bb"),
        "iv_bolus_bb": BolusTarget("A_c_bb"),
    },
    reference=(
        "F. Regazzoni, M. Salvador, P. C. Africa, M. Fedele, L. Dede', A. Quarteroni, A cardiac electromechanical "
        "model coupled with a lumped-parameter model for closed-loop blood circulation, J Comput Phys 457:111083, "
        "2022 (arXiv:2011.15040); default parameters and initial state of the circulation package's Regazzoni2020 "
        "model (H. Finsberg, github.com/ComputationalPhysiology/circulation, MIT licence); "
        "Holford & Sheiner 1981 (Emax)"
    ),
)

MODELS_HERE: list = [CIRC_0D]


# ---------------------------------------------------------------- beat events
def _pk_central(P: dict, drug: str, ev: Events | None, model: Model, t: np.ndarray) -> np.ndarray:
    """Central amount A_c [mg] at times t [m] from the dose events (closed-form 1-cmt oral/bolus PK).

    Dose events at time <= t count (a dose at the start of a beat acts on that beat)."""
    m = t.shape[0]
    A = np.zeros(m)
    if ev is None or ev.time.shape[0] == 0:
        return A
    ka = P[f"ka_{drug}"] / 3600.0
    ke = P[f"CL_{drug}"] / P[f"V_{drug}"] / 3600.0
    gut = model.state_names.index(f"A_gut_{drug}")
    cen = model.state_names.index(f"A_c_{drug}")
    for r in range(ev.time.shape[0]):
        td, kd, gd, vd = ev.time[r], ev.kind[r], ev.target[r], ev.value[r]
        s = t - td
        on = np.isfinite(td) & (s >= 0) & (kd == EVENT_STATE)
        if not on.any():
            continue
        s = np.where(on, s, 0.0)
        eke = np.exp(-ke * s)
        d = ka - ke
        # Bateman function; its ka -> ke limit ka s exp(-ka s) where the rates (nearly) coincide
        close = np.abs(d) <= 1e-9 * ka
        bat = np.where(close, ka * s * np.exp(-ka * s),
                       ka / np.where(close, 1.0, d) * (eke - np.exp(-ka * s)))
        A += np.where(on & (gd == gut), vd * bat, 0.0) + np.where(on & (gd == cen), vd * eke, 0.0)
    return A


def beat_lengths_hr(model: Model, P: np.ndarray, t: np.ndarray, doses: Events | None = None) -> np.ndarray:
    """Heart rate [1/min] at times t [m]: HR lowered by the beta-blocker concentration."""
    pr = {n: P[i] for i, n in enumerate(model.parameter_names)}
    C = 1000.0 * _pk_central(pr, "bb", doses, model, t) / pr["V_bb"]
    C = np.maximum(C, 0.0)
    g = pr["gamma_bb"]
    return pr["HR"] * (1.0 - pr["Emax_bb"] * C**g / (pr["EC50_bb"] ** g + C**g))


def beat_events(model: Model, P: np.ndarray, t_end: float, doses: Events | None = None) -> Events:
    """Per-patient beat events up to t_end for parameters P [n_par, m].

    At the end of each beat (time t_k): tau += -(t_k - t_{k-1}); and, where the next beat's length
    differs (beta-blocker), dT_beat += T_{k+1} - T_k. A first event at t = 0 sets beat 1's length
    if a dose at t = 0 already changes it. Without beta-blocker doses every beat lasts 60/HR.
    """
    m = P.shape[1]
    tau = model.state_names.index("tau")
    dtb = model.input_names.index("dT_beat")
    hr0 = P[model.parameter_names.index("HR")]
    T0 = 60.0 / hr0
    gut = model.state_names.index("A_gut_bb")
    cen = model.state_names.index("A_c_bb")
    has_bb = doses is not None and doses.time.shape[0] > 0 and bool(
        (np.isfinite(doses.time) & (doses.kind == EVENT_STATE) & ((doses.target == gut) | (doses.target == cen))
         & (doses.value != 0)).any())
    if not has_bb:
        # k T computed directly (no running sum): beat k ends at k * T0
        n = int(np.floor(t_end / T0.min() + 1e-9)) if m else 0
        k = np.arange(1, n + 1, dtype=float)[:, None]
        tk = k * T0[None, :]
        prev = (k - 1) * T0[None, :]
        tt = np.where(tk <= t_end * (1 + 1e-12), tk, np.inf)
        return Events(tt, np.full(tt.shape, EVENT_STATE, np.int8), np.full(tt.shape, tau, np.int16),
                      np.where(np.isfinite(tt), -(tk - prev), 0.0))
    rows_t, rows_k, rows_g, rows_v = [], [], [], []
    t_start = np.zeros(m)
    T_cur = 60.0 / beat_lengths_hr(model, P, t_start, doses)  # beat 1
    d0 = T_cur - T0
    if (d0 != 0).any():
        rows_t.append(np.where(d0 != 0, 0.0, np.inf))
        rows_k.append(np.full(m, EVENT_INPUT, np.int8))
        rows_g.append(np.full(m, dtb, np.int16))
        rows_v.append(np.where(d0 != 0, d0, 0.0))
    while True:
        t_k = t_start + T_cur
        live = t_k <= t_end * (1 + 1e-12)
        if not live.any():
            break
        rows_t.append(np.where(live, t_k, np.inf))
        rows_k.append(np.full(m, EVENT_STATE, np.int8))
        rows_g.append(np.full(m, tau, np.int16))
        rows_v.append(np.where(live, -(t_k - t_start), 0.0))
        T_next = 60.0 / beat_lengths_hr(model, P, t_k, doses)
        dT = np.where(live, T_next - T_cur, 0.0)
        if (dT != 0).any():
            rows_t.append(np.where(live & (dT != 0), t_k, np.inf))
            rows_k.append(np.full(m, EVENT_INPUT, np.int8))
            rows_g.append(np.full(m, dtb, np.int16))
            rows_v.append(dT)
        t_start = np.where(live, t_k, t_start)
        T_cur = np.where(live, T_next, T_cur)
    if not rows_t:
        return Events.empty(m)
    return _sorted(Events(np.vstack(rows_t), np.vstack(rows_k), np.vstack(rows_g), np.vstack(rows_v)))


def _sorted(ev: Events) -> Events:
    """Per patient: events in time order (stable), padding (+inf) last, all-padding rows dropped."""
    order = np.argsort(ev.time, axis=0, kind="stable")
    take = lambda a: np.ascontiguousarray(np.take_along_axis(a, order, axis=0))  # noqa: E731
    out = Events(take(ev.time), take(ev.kind), take(ev.target), take(ev.value))
    n = int(np.isfinite(out.time).sum(axis=0).max()) if out.time.size else 0
    return Events(out.time[:n], out.kind[:n], out.target[:n], out.value[:n])


def merge_events(a: Events, b: Events) -> Events:
    """Both event lists in one, per patient in time order; at equal times a's events come first."""
    if b.time.shape[0] == 0:
        return a
    if a.time.shape[0] == 0:
        return b
    return _sorted(Events(np.vstack([a.time, b.time]), np.vstack([a.kind, b.kind]).astype(np.int8),
                          np.vstack([a.target, b.target]).astype(np.int16), np.vstack([a.value, b.value])))


def circulation_events(model: Model, P: np.ndarray, doses: Events, t_end: float) -> Events:
    """The hook: a chunk's dose events (engine.dosing.build_events) plus its beat events up to t_end."""
    return merge_events(doses, beat_events(model, P, t_end, doses))


# model name -> hook(model, P [n_par, m], dose events, t_end) -> all events of the chunk
EVENT_HOOKS = {CIRC_0D.name: circulation_events}


# ---------------------------------------------------------------- haemodynamics
def haemodynamics(t: np.ndarray, p_ar: np.ndarray, V_LV: np.ndarray, HR, n_beats: float = 1.0) -> dict:
    """Per-patient haemodynamic summary over the last n_beats beats of a sampled trajectory.

    t [T] (s), p_ar [m, T] arterial pressure (mmHg, p_AR_SYS), V_LV [m, T] (mL), HR (1/min) scalar,
    [m], or an HR_eff trace [m, T] (its last value is used). Sampling should resolve a beat
    (a few ms). Returns arrays [m]: SBP, DBP, MAP (time average, trapezoid), PP, EDV, ESV,
    SV = EDV - ESV (mL), EF = SV / EDV (%), CO = SV * HR (L/min).
    """
    t = np.asarray(t, float)
    p_ar, V_LV = np.atleast_2d(p_ar), np.atleast_2d(V_LV)
    m = p_ar.shape[0]
    hr = np.asarray(HR, float)
    hr = hr[:, -1] if hr.ndim == 2 else np.broadcast_to(hr, (m,))
    win = t[None, :] >= (t[-1] - n_beats * 60.0 / hr[:, None]) - 1e-9
    P = np.where(win, p_ar, np.nan)
    V = np.where(win, V_LV, np.nan)
    sbp, dbp = np.nanmax(P, axis=1), np.nanmin(P, axis=1)
    edv, esv = np.nanmax(V, axis=1), np.nanmin(V, axis=1)
    dt = np.diff(t)[None, :]
    both = win[:, 1:] & win[:, :-1]
    area = np.sum(np.where(both, 0.5 * (p_ar[:, 1:] + p_ar[:, :-1]) * dt, 0.0), axis=1)
    span = np.sum(np.where(both, dt, 0.0), axis=1)
    sv = edv - esv
    return {"SBP": sbp, "DBP": dbp, "MAP": area / span, "PP": sbp - dbp, "EDV": edv, "ESV": esv,
            "SV": sv, "EF": 100.0 * sv / edv, "CO": sv * hr / 1000.0}
