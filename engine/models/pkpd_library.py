"""PK/PD model library beyond the linear 1-/2-compartment models of `pkpd.py`.

* ``pk_3cmt``        three-compartment disposition (mammillary), bolus / infusion / oral.
* ``pk_1cmt_mm``     one compartment with Michaelis–Menten (saturable) elimination.
* ``pk_2cmt_effect`` two compartments + effect compartment (ke0) + sigmoid Emax on Ce.
* ``pk_2cmt_idr1`` .. ``pk_2cmt_idr4``  two compartments driving the four basic indirect
  response models of Dayneka, Garg & Jusko (1993):

      dR/dt = kin * (1 - I(C)) - kout * R             (I:   drug inhibits production)
      dR/dt = kin - kout * (1 - I(C)) * R             (II:  drug inhibits loss)
      dR/dt = kin * (1 + S(C)) - kout * R             (III: drug stimulates production)
      dR/dt = kin - kout * (1 + S(C)) * R             (IV:  drug stimulates loss)

      I(C) = Imax C^gamma / (IC50^gamma + C^gamma),  S(C) = Emax C^gamma / (EC50^gamma + C^gamma)

  with R(0) = R0 = kin / kout (the drug-free steady state). Imax should be in (0, 1]; the
  declaration language has no upper bounds, so Imax > 1 is accepted and makes model I's production
  (model II's loss) negative at high C — keep variability on Imax small or leave it fixed.

Units: amounts mg, volumes L, clearances L/h, rate constants 1/h, time h, concentration mg/L;
the response R is in the user's own unit (kin in that unit per h). Typical values are
illustrative defaults; jobs override them. Parameter names avoid the usual covariate names
(age, sex, weight, height, crcl). Every model takes doses by routes iv_bolus (into central),
iv_infusion (zero-order rate into central) and oral (F × amount into a depot, first-order ka).
"""

from kernels.ode.model import BolusTarget, InfusionTarget, Input, Model, Output, Parameter, State

_DOSES = {
    "iv_bolus": BolusTarget("A_central"),
    "iv_infusion": InfusionTarget("R_inf"),
    "oral": BolusTarget("A_depot", fraction="F"),
}
_INPUTS = [Input("R_inf", "mg/h")]
_DEPOT = State("A_depot", 0.0, "mg", "amount at the absorption site")
_CENTRAL = State("A_central", 0.0, "mg", "amount in the central compartment")
_ABS = [
    Parameter("ka", 1.0, "1/h", "first-order absorption rate"),
    Parameter("F", 1.0, "1", "oral bioavailability"),
]
_C_OUT = Output("C", "C", "mg/L", "central concentration")
_GIBALDI = "Gibaldi & Perrier, Pharmacokinetics, 2nd ed. (Marcel Dekker 1982)"

# ---------------------------------------------------------------- pk_3cmt
PK_3CMT = Model(
    name="pk_3cmt",
    description="Three-compartment mammillary PK (bolus, infusion, first-order oral)",
    time_unit="h",
    states=[
        _DEPOT,
        _CENTRAL,
        State("A_periph1", 0.0, "mg", "amount in the first (shallow) peripheral compartment"),
        State("A_periph2", 0.0, "mg", "amount in the second (deep) peripheral compartment"),
    ],
    parameters=[
        Parameter("CL", 5.0, "L/h", "clearance from the central compartment"),
        Parameter("V1", 20.0, "L", "central volume"),
        Parameter("Q2", 15.0, "L/h", "inter-compartmental clearance, central <-> periph1"),
        Parameter("V2", 40.0, "L", "first peripheral volume"),
        Parameter("Q3", 2.0, "L/h", "inter-compartmental clearance, central <-> periph2"),
        Parameter("V3", 150.0, "L", "second peripheral volume"),
        *_ABS,
    ],
    inputs=_INPUTS,
    expressions=[("C", "A_central / V1")],
    derivatives={
        "A_depot": "-ka * A_depot",
        "A_central": "ka * A_depot - (CL + Q2 + Q3) / V1 * A_central + Q2 / V2 * A_periph1"
                     " + Q3 / V3 * A_periph2 + R_inf",
        "A_periph1": "Q2 / V1 * A_central - Q2 / V2 * A_periph1",
        "A_periph2": "Q3 / V1 * A_central - Q3 / V3 * A_periph2",
    },
    outputs=[_C_OUT],
    doses=_DOSES,
    reference=f"{_GIBALDI}, ch. 2 and App. C (multicompartment models, tri-exponential disposition)",
)

# ---------------------------------------------------------------- pk_1cmt_mm
PK_1CMT_MM = Model(
    name="pk_1cmt_mm",
    description="One-compartment PK with Michaelis-Menten elimination (bolus, infusion, first-order oral)",
    time_unit="h",
    states=[_DEPOT, _CENTRAL],
    parameters=[
        Parameter("Vmax", 20.0, "mg/h", "maximal elimination rate"),
        Parameter("Km", 4.0, "mg/L", "concentration at half-maximal elimination rate"),
        Parameter("V1", 30.0, "L", "central volume"),
        *_ABS,
    ],
    inputs=_INPUTS,
    expressions=[("C", "A_central / V1")],
    derivatives={
        "A_depot": "-ka * A_depot",
        "A_central": "ka * A_depot - Vmax * C / (Km + C) + R_inf",
    },
    outputs=[_C_OUT],
    doses=_DOSES,
    reference=f"{_GIBALDI}, ch. 7 (nonlinear pharmacokinetics, Michaelis-Menten elimination)",
)

# ---------------------------------------------------------------- two-compartment PK block
_PK2_STATES = [_DEPOT, _CENTRAL, State("A_periph", 0.0, "mg", "amount in the peripheral compartment")]
_PK2_PARAMS = [
    Parameter("CL", 5.0, "L/h", "clearance"),
    Parameter("V1", 30.0, "L", "central volume"),
    Parameter("Q", 10.0, "L/h", "inter-compartmental clearance"),
    Parameter("V2", 50.0, "L", "peripheral volume"),
    *_ABS,
]
_PK2_DERIVS = {
    "A_depot": "-ka * A_depot",
    "A_central": "ka * A_depot - (CL + Q) / V1 * A_central + Q / V2 * A_periph + R_inf",
    "A_periph": "Q / V1 * A_central - Q / V2 * A_periph",
}
_GAMMA = Parameter("gamma", 1.0, "1", "Hill coefficient")

# ---------------------------------------------------------------- pk_2cmt_effect
PK_2CMT_EFFECT = Model(
    name="pk_2cmt_effect",
    description="Two-compartment PK with an effect compartment (ke0) and sigmoid Emax on the effect-site "
                "concentration",
    time_unit="h",
    states=[*_PK2_STATES, State("Ce", 0.0, "mg/L", "effect-site concentration")],
    parameters=[
        *_PK2_PARAMS,
        Parameter("ke0", 0.5, "1/h", "effect-site equilibration rate constant"),
        Parameter("E0", 0.0, "%", "baseline effect", positive=False),
        Parameter("Emax", 100.0, "%", "maximal drug effect", positive=False),
        Parameter("EC50", 2.0, "mg/L", "effect-site concentration at half-maximal effect"),
        _GAMMA,
    ],
    inputs=_INPUTS,
    # max(Ce, 0) keeps a fractional Hill power finite if round-off makes Ce a hair negative
    expressions=[("C", "A_central / V1"), ("Cep", "max(Ce, 0)")],
    derivatives={**_PK2_DERIVS, "Ce": "ke0 * (C - Ce)"},
    outputs=[
        _C_OUT,
        Output("E", "E0 + Emax * Cep**gamma / (EC50**gamma + Cep**gamma)", "%", "sigmoid Emax effect of Ce"),
    ],
    doses=_DOSES,
    reference="Sheiner, Stanski, Vozeh, Miller & Ham, Clin Pharmacol Ther 25:358-371 (1979) (effect "
              f"compartment); Holford & Sheiner, Clin Pharmacokinet 6:429-453 (1981) (sigmoid Emax); {_GIBALDI}, ch. 2",
)


# ---------------------------------------------------------------- indirect response models I-IV
def _idr(n: int) -> Model:
    inhibit = n in (1, 2)
    on_kin = n in (1, 3)
    if inhibit:
        drug = [
            Parameter("Imax", 1.0, "1", "maximal fractional inhibition (0 < Imax <= 1)"),
            Parameter("IC50", 2.0, "mg/L", "concentration at half-maximal inhibition"),
        ]
        factor = "(1 - Imax * Cp**gamma / (IC50**gamma + Cp**gamma))"
        what = "inhibition"
    else:
        drug = [
            Parameter("Emax", 2.0, "1", "maximal fractional stimulation"),
            Parameter("EC50", 2.0, "mg/L", "concentration at half-maximal stimulation"),
        ]
        factor = "(1 + Emax * Cp**gamma / (EC50**gamma + Cp**gamma))"
        what = "stimulation"
    dR = f"kin * {factor} - kout * R" if on_kin else f"kin - kout * {factor} * R"
    roman = ["I", "II", "III", "IV"][n - 1]
    return Model(
        name=f"pk_2cmt_idr{n}",
        description=f"Two-compartment PK driving indirect response model {roman}: {what} of "
                    f"{'production (kin)' if on_kin else 'loss (kout)'} by the central concentration",
        time_unit="h",
        states=[*_PK2_STATES, State("R", "kin / kout", "", "response (starts at R0 = kin / kout)")],
        parameters=[
            *_PK2_PARAMS,
            Parameter("kin", 10.0, "1/h", "zero-order production rate of the response (response units per h)"),
            Parameter("kout", 0.1, "1/h", "first-order loss rate constant of the response"),
            *drug,
            _GAMMA,
        ],
        inputs=_INPUTS,
        # max(C, 0) keeps a fractional Hill power finite if round-off makes C a hair negative
        expressions=[("C", "A_central / V1"), ("Cp", "max(C, 0)")],
        derivatives={**_PK2_DERIVS, "R": dR},
        outputs=[_C_OUT],
        doses=_DOSES,
        reference="Dayneka, Garg & Jusko, J Pharmacokinet Biopharm 21:457-478 (1993) (indirect response "
                  f"model {roman}); {_GIBALDI}, ch. 2 (two-compartment PK)",
    )


PK_2CMT_IDR1, PK_2CMT_IDR2, PK_2CMT_IDR3, PK_2CMT_IDR4 = (_idr(n) for n in (1, 2, 3, 4))

MODELS_HERE: list[Model] = [
    PK_3CMT,
    PK_1CMT_MM,
    PK_2CMT_EFFECT,
    PK_2CMT_IDR1,
    PK_2CMT_IDR2,
    PK_2CMT_IDR3,
    PK_2CMT_IDR4,
]
