"""Linear PK/PD library: one- and two-compartment disposition, IV bolus, zero-order infusion and
first-order oral absorption, with a direct (sigmoid) Emax effect on the central concentration.

Units: amounts mg, volumes L, clearances L/h, rate constants 1/h, time h, concentration mg/L.
Typical values are illustrative defaults; jobs override them.
"""

from kernels.ode.model import BolusTarget, InfusionTarget, Input, Model, Output, Parameter, State

_EFFECT_PARAMS = [
    Parameter("E0", 0.0, "%", "baseline effect", positive=False),
    Parameter("Emax", 100.0, "%", "maximal drug effect", positive=False),
    Parameter("EC50", 2.0, "mg/L", "concentration at half-maximal effect"),
    Parameter("gamma", 1.0, "1", "Hill coefficient"),
]
# max(C, 0) keeps a fractional Hill power finite if round-off makes C a hair negative
_EMAX = "E0 + Emax * max(C, 0)**gamma / (EC50**gamma + max(C, 0)**gamma)"
_DOSES = {
    "iv_bolus": BolusTarget("A_central"),
    "iv_infusion": InfusionTarget("R_inf"),
    "oral": BolusTarget("A_depot", fraction="F"),
}

PK_1CMT = Model(
    name="pk_1cmt",
    description="One-compartment PK (bolus, infusion, first-order oral) with direct Emax effect",
    time_unit="h",
    states=[
        State("A_depot", 0.0, "mg", "amount at the absorption site"),
        State("A_central", 0.0, "mg", "amount in the central compartment"),
    ],
    parameters=[
        Parameter("CL", 5.0, "L/h", "clearance"),
        Parameter("V1", 30.0, "L", "central volume"),
        Parameter("ka", 1.0, "1/h", "first-order absorption rate"),
        Parameter("F", 1.0, "1", "oral bioavailability"),
        *_EFFECT_PARAMS,
    ],
    inputs=[Input("R_inf", "mg/h")],
    expressions=[("C", "A_central / V1")],
    derivatives={
        "A_depot": "-ka * A_depot",
        "A_central": "ka * A_depot - CL / V1 * A_central + R_inf",
    },
    outputs=[
        Output("C", "C", "mg/L", "central concentration"),
        Output("E", _EMAX, "%", "direct Emax effect"),
    ],
    doses=_DOSES,
    reference="Gibaldi & Perrier, Pharmacokinetics (2nd ed.), ch. 1-2; Holford & Sheiner 1981 (Emax)",
)

PK_2CMT = Model(
    name="pk_2cmt",
    description="Two-compartment PK (bolus, infusion, first-order oral) with direct Emax effect",
    time_unit="h",
    states=[
        State("A_depot", 0.0, "mg", "amount at the absorption site"),
        State("A_central", 0.0, "mg", "amount in the central compartment"),
        State("A_periph", 0.0, "mg", "amount in the peripheral compartment"),
    ],
    parameters=[
        Parameter("CL", 5.0, "L/h", "clearance"),
        Parameter("V1", 30.0, "L", "central volume"),
        Parameter("Q", 10.0, "L/h", "inter-compartmental clearance"),
        Parameter("V2", 50.0, "L", "peripheral volume"),
        Parameter("ka", 1.0, "1/h", "first-order absorption rate"),
        Parameter("F", 1.0, "1", "oral bioavailability"),
        *_EFFECT_PARAMS,
    ],
    inputs=[Input("R_inf", "mg/h")],
    expressions=[("C", "A_central / V1")],
    derivatives={
        "A_depot": "-ka * A_depot",
        "A_central": "ka * A_depot - (CL + Q) / V1 * A_central + Q / V2 * A_periph + R_inf",
        "A_periph": "Q / V1 * A_central - Q / V2 * A_periph",
    },
    outputs=[
        Output("C", "C", "mg/L", "central concentration"),
        Output("E", _EMAX, "%", "direct Emax effect"),
    ],
    doses=_DOSES,
    reference="Gibaldi & Perrier, Pharmacokinetics (2nd ed.), ch. 2; Holford & Sheiner 1981 (Emax)",
)
