"""Oncology twins: two-compartment PK driving tumour growth inhibition (efficacy) and
chemotherapy-induced neutropenia (toxicity).

``onco_simeoni_friberg`` — one cytotoxic drug
-------------------------------------------
PK (two compartments, first-order elimination; routes iv_bolus, iv_infusion, oral)::

    dA_depot/dt   = -ka A_depot
    dA_central/dt =  ka A_depot - (CL + Q)/V1 A_central + Q/V2 A_periph + R_inf
    dA_periph/dt  =  Q/V1 A_central - Q/V2 A_periph
    C = max(A_central / V1, 0)                                       [mg/L]

Tumour growth inhibition, Simeoni et al., Cancer Res 64:1094-1101 (2004)::

    w       = x1 + x2 + x3 + x4                                      tumour size (weight, g ~ cm^3)
    dx1/dt  = lambda0 x1 / [1 + (lambda0/lambda1 w)^psi]^(1/psi) - k2 C x1
    dx2/dt  = k2 C x1 - k1 x2
    dx3/dt  = k1 (x2 - x3)
    dx4/dt  = k1 (x3 - x4)                    x1(0) = w0, x2..x4(0) = 0, psi = 20

  The growth law is exponential (rate lambda0) while w << lambda1/lambda0 and linear (slope
  lambda1) above it. It is evaluated in the algebraically identical overflow-free form
  lambda0 x1 / (max(r, 1) (1 + min(r, 1/max(r, 1))^psi)^(1/psi)), r = lambda0 w / lambda1, so that
  r^20 cannot overflow (float32 overflows at r ≈ 85); r uses max(w, 0), so round-off making a
  vanishing tumour a hair negative cannot give a NaN power.

Neutropenia, Friberg et al., J Clin Oncol 20:4713-4721 (2002)::

    ktr        = 4 / MTT
    Edrug      = slope C + Emax_anc C / (EC50_anc + C)               (linear or Emax drug effect)
    dProl/dt   = ktr Prol (1 - Edrug) (Circ0/Circ)^gamma - ktr Prol
    dTransit1/dt = ktr (Prol - Transit1), dTransit2/dt = ktr (Transit1 - Transit2),
    dTransit3/dt = ktr (Transit2 - Transit3), dCirc/dt = ktr (Transit3 - Circ)
    Prol(0) = Transit1..3(0) = Circ(0) = Circ0; ANC = Circ             [10^9/L]

  (Circ is floored at 1e-9 inside the feedback only, so round-off can never divide by zero; the
  exact solution stays positive, so this never changes a result.)

``onco_combo`` — two drugs, A (routes iv_bolus, iv_infusion, oral; parameters named as above)
and B (routes iv_bolus_B, iv_infusion_B, oral_B; parameters with suffix _B), each with its own
two-compartment PK (C, C_B). Tumour kill rate on proliferating cells::

    kill = max(k2 C + k2_B C_B + psi_AB C C_B, 0)
    dx1/dt     = growth - kill x1
    damage chain A (x2, x3, x4; rate k1):    input kill x1 k2 C / (k2 C + k2_B C_B)
    damage chain B (x2_B, x3_B, x4_B; k1_B): input kill x1 k2_B C_B / (k2 C + k2_B C_B)
    w = x1 + x2 + x3 + x4 + x2_B + x3_B + x4_B

  psi_AB = 0 is Bliss independence. The drugs kill as independent competing hazards, so over any
  short interval the fraction killed is 1 - (1 - E_A)(1 - E_B) with E_i = 1 - exp(-k_i dt), i.e.
  the kill *rates* add; over a whole course the surviving fraction of x1 is the product of the two
  single-drug survivals (in the exponential-growth phase exactly). Each drug's damaged cells die
  through that drug's own chain: the no-interaction combination model of Magni et al., IEEE Trans
  Biomed Eng 59:2161-2170 (2012). psi_AB != 0 is the interaction term on the kill rate of Terranova
  et al., Cancer Chemother Pharmacol 72:471-482 (2013): psi_AB > 0 synergy, < 0 antagonism. How the
  interaction-damaged cells are shared between the two chains (in proportion to each drug's own
  kill rate, so both chains stay non-negative) is this library's choice; it matters only when
  psi_AB != 0 and k1 != k1_B. The neutrophil drug effects add the same way
  (independent hazards on the proliferating pool): Edrug = E_A(C) + E_B(C_B), each of the
  linear + Emax form above.

Units: time h, amounts mg, volumes L, clearances L/h, C mg/L, tumour size g (≈ cm^3 at unit
density), neutrophils 10^9/L.

Typical values (defaults; jobs override them):
* PK of drug A: docetaxel two-compartment model of Onoue et al., Eur J Clin Pharmacol 72:703-710
  (2016), Table 2 (CL 32.6 L/h, Q 5.34 L/h, V1 5.77 L, V2 11.0 L), as used with the Friberg model
  in the DTAT R package (Norris 2017).
* Neutropenia: Friberg et al. (2002), docetaxel, neutrophils, linear drug effect: Circ0 = 5.05
  10^9/L, MTT = 88.7 h, gamma = 0.161, slope = 8.58 per µM = 8.58 / 0.808 = 10.6 L/mg (docetaxel
  808 g/mol). (The Emax variant: Emax 83.9, EC50 7.17 µM = 5.79 mg/L, MTT 89.3 h, gamma 0.163; the
  EC50_anc default is that EC50, Emax_anc defaults to 0.) Values as tabulated from the paper by the
  R packages myelo (`fribergPars02`) and DTAT (Norris 2017, "Table 4, row 1"). With them the nadir
  after one 1-h infusion of 180 mg (100 mg/m^2) falls at day 7.75 (2.1 MTT), 0.67 x 10^9/L, close
  to the day-7 nadir of Friberg's docetaxel data; tests/test_oncology.py explains the window.
* Tumour: Simeoni et al. (2004), Table 2, paclitaxel experiment 1, as transcribed in nlmixr2lib
  (oncology_xenograft_simeoni_2004) (xenografts; per day and ng/mL in the paper, converted here to
  per hour and mg/L): lambda0 = 0.273/d, lambda1 = 0.814 g/d,
  k1 = 0.968/d, k2 = 6.29e-4 (ng/mL)^-1 d^-1 = 0.0262 L/mg/h; w0 = 0.1 g is illustrative. These are
  mouse-xenograft rates (doubling ~2.5 days); a human twin overrides lambda0, lambda1, k2 and w0
  (jobs/oncology_example.toml does, with the values stated there).
* Drug B: illustrative values only (no specific drug).
"""

from kernels.ode.model import BolusTarget, InfusionTarget, Input, Model, Output, Parameter, State

_SIMEONI = ("Simeoni M, Magni P, Cammia C, et al. Predictive pharmacokinetic-pharmacodynamic modeling of tumor "
            "growth kinetics in xenograft models after administration of anticancer agents. Cancer Res "
            "64:1094-1101 (2004)")
_FRIBERG = ("Friberg LE, Henningsson A, Maas H, Nguyen L, Karlsson MO. Model of chemotherapy-induced "
            "myelosuppression with parameter consistency across drugs. J Clin Oncol 20:4713-4721 (2002)")
_ONOUE = ("Onoue H, Yano I, Tanaka A, et al. Significant effect of age on docetaxel pharmacokinetics in Japanese "
          "female breast cancer patients by using the population modeling approach. Eur J Clin Pharmacol "
          "72:703-710 (2016)")
_MAGNI = ("Magni P, Terranova N, Del Bene F, Germani M, De Nicolao G. A minimal model of tumor growth inhibition "
          "in combination regimens under the hypothesis of no interaction between drugs. IEEE Trans Biomed Eng "
          "59:2161-2170 (2012)")
_TERRANOVA = ("Terranova N, Germani M, Del Bene F, Magni P. A predictive pharmacokinetic-pharmacodynamic model of "
              "tumor growth kinetics in xenograft mice after administration of anticancer agents given in "
              "combination. Cancer Chemother Pharmacol 72:471-482 (2013)")

_P = Parameter
_DAY = 24.0


def _pk(sfx: str, typical: dict[str, float], what: str) -> tuple[list[State], list[Parameter], dict[str, str]]:
    """Two-compartment PK block: states A_* (drug A, sfx "") or B_* (drug B, sfx "_B")."""
    pre = "B" if sfx else "A"
    dep, cen, per = f"{pre}_depot", f"{pre}_central", f"{pre}_periph"
    CL, V1, Q, V2, ka, F, R = (f"{n}{sfx}" for n in ("CL", "V1", "Q", "V2", "ka", "F", "R_inf"))
    states = [
        State(dep, 0.0, "mg", f"{what}: amount at the absorption site"),
        State(cen, 0.0, "mg", f"{what}: amount in the central compartment"),
        State(per, 0.0, "mg", f"{what}: amount in the peripheral compartment"),
    ]
    params = [
        _P(CL, typical["CL"], "L/h", f"{what}: clearance"),
        _P(V1, typical["V1"], "L", f"{what}: central volume"),
        _P(Q, typical["Q"], "L/h", f"{what}: inter-compartmental clearance"),
        _P(V2, typical["V2"], "L", f"{what}: peripheral volume"),
        _P(ka, typical["ka"], "1/h", f"{what}: first-order absorption rate"),
        _P(F, typical["F"], "1", f"{what}: oral bioavailability"),
    ]
    derivs = {
        dep: f"-{ka} * {dep}",
        cen: f"{ka} * {dep} - ({CL} + {Q}) / {V1} * {cen} + {Q} / {V2} * {per} + {R}",
        per: f"{Q} / {V1} * {cen} - {Q} / {V2} * {per}",
    }
    return states, params, derivs


def _anc_drug(sfx: str, typical: dict[str, float], what: str) -> list[Parameter]:
    return [
        _P(f"slope{sfx}", typical["slope"], "L/mg", f"{what}: linear drug effect on neutrophil progenitors "
           "(Edrug = slope C; 0 switches it off)", positive=False),
        _P(f"Emax_anc{sfx}", 0.0, "1", f"{what}: maximal drug effect of the Emax form (0 switches it off)",
           positive=False),
        _P(f"EC50_anc{sfx}", typical["EC50_anc"], "mg/L",
           f"{what}: concentration at half the maximal effect (Emax form)"),
    ]


# docetaxel (drug A) and an illustrative drug B
_PK_A = dict(CL=32.6, V1=5.77, Q=5.34, V2=11.0, ka=1.0, F=1.0)
_PK_B = dict(CL=20.0, V1=15.0, Q=10.0, V2=40.0, ka=1.0, F=1.0)
_ANC_A = dict(slope=8.58 / 0.808, EC50_anc=7.17 * 0.808)
_ANC_B = dict(slope=5.0, EC50_anc=5.0)

_TUMOUR_PARAMS = [
    _P("w0", 0.1, "g", "initial tumour size (all cells proliferating)"),
    _P("lambda0", 0.273 / _DAY, "1/h", "exponential growth rate constant"),
    _P("lambda1", 0.814 / _DAY, "g/h", "linear growth rate"),
    _P("psi", 20.0, "1", "sharpness of the exponential-to-linear switch (Simeoni: fixed at 20)"),
    _P("k1", 0.968 / _DAY, "1/h", "transit rate constant through the damage compartments (drug A)"),
    _P("k2", 0.629 / _DAY, "L/mg/h", "kill potency on proliferating cells (drug A)", positive=False),
]
_FRIBERG_PARAMS = [
    _P("Circ0", 5.05, "10^9/L", "baseline circulating neutrophil count"),
    _P("MTT", 88.7, "h", "mean transit time through the maturation chain (ktr = 4/MTT)"),
    _P("gamma", 0.161, "1", "feedback exponent of (Circ0/Circ)^gamma on proliferation"),
]
_GROWTH = [
    ("r_w", "lambda0 / lambda1 * max(w, 0)"),
    ("growth", "lambda0 * x1 / (max(r_w, 1) * (1 + min(r_w, 1 / max(r_w, 1))**psi)**(1 / psi))"),
]
_FRIBERG_STATES = [
    State("Prol", "Circ0", "10^9/L", "proliferating neutrophil progenitors"),
    State("Transit1", "Circ0", "10^9/L", "maturing neutrophils, transit compartment 1"),
    State("Transit2", "Circ0", "10^9/L", "maturing neutrophils, transit compartment 2"),
    State("Transit3", "Circ0", "10^9/L", "maturing neutrophils, transit compartment 3"),
    State("Circ", "Circ0", "10^9/L", "circulating neutrophils (ANC)"),
]
_FRIBERG_EXPR = [("ktr", "4 / MTT"), ("feedback", "(Circ0 / max(Circ, 1e-9))**gamma")]
_FRIBERG_DERIVS = {
    "Prol": "ktr * Prol * (1 - Edrug) * feedback - ktr * Prol",
    "Transit1": "ktr * (Prol - Transit1)",
    "Transit2": "ktr * (Transit1 - Transit2)",
    "Transit3": "ktr * (Transit2 - Transit3)",
    "Circ": "ktr * (Transit3 - Circ)",
}
_DAMAGE_A = [
    State("x1", "w0", "g", "proliferating tumour cells"),
    State("x2", 0.0, "g", "damaged tumour cells, compartment 1 (drug A)"),
    State("x3", 0.0, "g", "damaged tumour cells, compartment 2 (drug A)"),
    State("x4", 0.0, "g", "damaged tumour cells, compartment 3 (drug A)"),
]


def _effect(sfx: str, conc: str) -> str:
    return f"slope{sfx} * {conc} + Emax_anc{sfx} * {conc} / (EC50_anc{sfx} + {conc})"


# ---------------------------------------------------------------- single drug
_pk_s, _pk_p, _pk_d = _pk("", _PK_A, "drug")
ONCO_SIMEONI_FRIBERG = Model(
    name="onco_simeoni_friberg",
    description="Two-compartment PK of one cytotoxic drug driving Simeoni tumour growth inhibition and Friberg "
                "neutropenia",
    time_unit="h",
    states=[*_pk_s, *_DAMAGE_A, *_FRIBERG_STATES],
    parameters=[*_pk_p, *_TUMOUR_PARAMS, *_FRIBERG_PARAMS, *_anc_drug("", _ANC_A, "drug")],
    inputs=[Input("R_inf", "mg/h")],
    expressions=[
        ("C", "max(A_central / V1, 0)"),
        ("w", "x1 + x2 + x3 + x4"),
        *_GROWTH,
        ("kill", "k2 * C"),
        ("Edrug", _effect("", "C")),
        *_FRIBERG_EXPR,
    ],
    derivatives={
        **_pk_d,
        "x1": "growth - kill * x1",
        "x2": "kill * x1 - k1 * x2",
        "x3": "k1 * (x2 - x3)",
        "x4": "k1 * (x3 - x4)",
        **_FRIBERG_DERIVS,
    },
    outputs=[
        Output("C", "C", "mg/L", "central concentration"),
        Output("W", "w", "g", "tumour size (x1 + damaged cells)"),
        Output("ANC", "Circ", "10^9/L", "absolute neutrophil count (Circ)"),
        Output("Edrug", "Edrug", "1", "drug effect on neutrophil progenitors"),
        Output("kill", "kill", "1/h", "kill rate constant on proliferating tumour cells"),
    ],
    doses={
        "iv_bolus": BolusTarget("A_central"),
        "iv_infusion": InfusionTarget("R_inf"),
        "oral": BolusTarget("A_depot", fraction="F"),
    },
    reference=f"{_SIMEONI}; {_FRIBERG}; PK typical values: {_ONOUE}",
)

# ---------------------------------------------------------------- two drugs
_pk_bs, _pk_bp, _pk_bd = _pk("_B", _PK_B, "drug B")
ONCO_COMBO = Model(
    name="onco_combo",
    description="Two cytotoxic drugs (own two-compartment PK each): Simeoni tumour growth inhibition with Bliss-"
                "independent kill plus an interaction term, and Friberg neutropenia driven by both",
    time_unit="h",
    states=[
        *_pk_s, *_pk_bs, *_DAMAGE_A,
        State("x2_B", 0.0, "g", "damaged tumour cells, compartment 1 (drug B)"),
        State("x3_B", 0.0, "g", "damaged tumour cells, compartment 2 (drug B)"),
        State("x4_B", 0.0, "g", "damaged tumour cells, compartment 3 (drug B)"),
        *_FRIBERG_STATES,
    ],
    parameters=[
        *_pk_p, *_pk_bp, *_TUMOUR_PARAMS,
        _P("k1_B", 0.968 / _DAY, "1/h", "transit rate constant through the damage compartments (drug B)"),
        _P("k2_B", 0.629 / _DAY, "L/mg/h", "kill potency on proliferating cells (drug B)", positive=False),
        _P("psi_AB", 0.0, "L^2/mg^2/h", "interaction on the kill rate (0: Bliss independence, > 0 synergy, "
           "< 0 antagonism)", positive=False),
        *_FRIBERG_PARAMS, *_anc_drug("", _ANC_A, "drug A"), *_anc_drug("_B", _ANC_B, "drug B"),
    ],
    inputs=[Input("R_inf", "mg/h"), Input("R_inf_B", "mg/h")],
    expressions=[
        ("C", "max(A_central / V1, 0)"),
        ("C_B", "max(B_central / V1_B, 0)"),
        ("w", "x1 + x2 + x3 + x4 + x2_B + x3_B + x4_B"),
        *_GROWTH,
        ("base", "k2 * C + k2_B * C_B"),
        ("kill", "max(base + psi_AB * C * C_B, 0)"),
        # each chain's share of the kill: in proportion to the drug's own kill rate (half each if neither
        # kills alone); x/x == 1 exactly, so with one drug absent its chain gets exactly nothing
        ("share_A", "ifelse(base > 0, k2 * C / max(base, 1e-30), 0.5)"),
        ("share_B", "ifelse(base > 0, k2_B * C_B / max(base, 1e-30), 0.5)"),
        ("Edrug", f"{_effect('', 'C')} + {_effect('_B', 'C_B')}"),
        *_FRIBERG_EXPR,
    ],
    derivatives={
        **_pk_d, **_pk_bd,
        "x1": "growth - kill * x1",
        "x2": "kill * share_A * x1 - k1 * x2",
        "x3": "k1 * (x2 - x3)",
        "x4": "k1 * (x3 - x4)",
        "x2_B": "kill * share_B * x1 - k1_B * x2_B",
        "x3_B": "k1_B * (x2_B - x3_B)",
        "x4_B": "k1_B * (x3_B - x4_B)",
        **_FRIBERG_DERIVS,
    },
    outputs=[
        Output("C", "C", "mg/L", "drug A central concentration"),
        Output("C_B", "C_B", "mg/L", "drug B central concentration"),
        Output("W", "w", "g", "tumour size (x1 + damaged cells of both chains)"),
        Output("ANC", "Circ", "10^9/L", "absolute neutrophil count (Circ)"),
        Output("Edrug", "Edrug", "1", "combined drug effect on neutrophil progenitors"),
        Output("kill", "kill", "1/h", "combined kill rate constant on proliferating tumour cells"),
    ],
    doses={
        "iv_bolus": BolusTarget("A_central"),
        "iv_infusion": InfusionTarget("R_inf"),
        "oral": BolusTarget("A_depot", fraction="F"),
        "iv_bolus_B": BolusTarget("B_central"),
        "iv_infusion_B": InfusionTarget("R_inf_B"),
        "oral_B": BolusTarget("B_depot", fraction="F_B"),
    },
    reference=f"{_SIMEONI}; {_MAGNI}; {_TERRANOVA}; {_FRIBERG}; drug A PK typical values: {_ONOUE}",
)

MODELS_HERE: list[Model] = [ONCO_SIMEONI_FRIBERG, ONCO_COMBO]
