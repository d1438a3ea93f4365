"""UVA/Padova type 1 diabetes model (the "2008" simulator), as simglucose 0.2.11 implements it.

The equations, clamps and units follow simglucose/patient/t1dpatient.py (`T1DPatient.model`) term
by term, so that replaying simglucose's per-minute inputs open-loop reproduces its glucose trace
(tests/test_glucose_uva_padova.py; data and provenance in tests/data/glucose/SOURCES.md).

Time is in minutes. States are per kg body weight as in the original (mg/kg, pmol/kg), except the
insulin-action states X, I1, Id (pmol/L). Parameter names are the column names of simglucose's
vpatient_params.csv (initial states x0_1..x0_13 stand for its columns "x0_ 1".."x0_13"); defaults
are adult#001. Columns the equations never read (EGPb, Gb, Ipb, Gpb, Gtb, Ilb, isc1ss, isc2ss, m5,
CL, HEb, Rdb, PCRb, dosekempt, i, patient_history) are not parameters, so that a job cannot vary a
value that has no effect; the basal states they describe are already x0_4..x0_13.

Inputs are piecewise constant and change only at events, as simglucose holds its action constant
over each 1-min patient step:
  CHO             carbohydrate ingestion rate, g/min (simglucose eats at 5 g/min)
  insulin         subcutaneous insulin infusion rate, U/min (basal + bolus, after pump quantisation)
  last_Qsto       stomach content Qsto1 + Qsto2 when the current meal started, mg
  last_foodtaken  carbohydrate eaten so far in the current meal, g (updated at each minute's start)
simglucose sets last_Qsto from the state at the first minute of a meal and increments
last_foodtaken minute by minute; events can only add known values, so a caller that simulates
meals must supply these two inputs itself (see the test). With both at 0, kgut = kmax.

Not in this version of the model (as in simglucose 0.2.11): the 2013 hypoglycaemia term on
utilisation, glucagon, time-varying hepatic insulin extraction (m3 is fixed at m30).
"""

from kernels.ode.model import InfusionTarget, Input, Model, Output, Parameter, State

_P = Parameter

# initial states: simglucose starts from params.iloc[2:15], i.e. columns x0_ 1 .. x0_13
_X0 = [
    ("x0_1", 0.0, "mg", "initial Qsto1"),
    ("x0_2", 0.0, "mg", "initial Qsto2"),
    ("x0_3", 0.0, "mg", "initial Qgut"),
    ("x0_4", 265.370112, "mg/kg", "initial Gp (basal Gpb)"),
    ("x0_5", 162.457097269, "mg/kg", "initial Gt (basal Gtb)"),
    ("x0_6", 5.5043265, "pmol/kg", "initial Ip (basal Ipb)"),
    ("x0_7", 0.0, "pmol/L", "initial X"),
    ("x0_8", 100.25, "pmol/L", "initial I1 (basal Ib)"),
    ("x0_9", 100.25, "pmol/L", "initial Id (basal Ib)"),
    ("x0_10", 3.20762505142, "pmol/kg", "initial Il (basal Ilb)"),
    ("x0_11", 72.4341762342, "pmol/kg", "initial Isc1 (basal isc1ss)"),
    ("x0_12", 141.153779328, "pmol/kg", "initial Isc2 (basal isc2ss)"),
    ("x0_13", 265.370112, "mg/kg", "initial Gs (basal Gpb)"),
]

_STATES = [
    ("Qsto1", "mg", "glucose in the stomach, solid phase"),
    ("Qsto2", "mg", "glucose in the stomach, liquid phase"),
    ("Qgut", "mg", "glucose in the intestine"),
    ("Gp", "mg/kg", "glucose mass in plasma and rapidly equilibrating tissues"),
    ("Gt", "mg/kg", "glucose mass in slowly equilibrating tissues"),
    ("Ip", "pmol/kg", "insulin mass in plasma"),
    ("X", "pmol/L", "insulin action on glucose utilisation (remote insulin)"),
    ("I1", "pmol/L", "delayed insulin signal, first compartment"),
    ("Id", "pmol/L", "delayed insulin signal acting on glucose production"),
    ("Il", "pmol/kg", "insulin mass in the liver"),
    ("Isc1", "pmol/kg", "subcutaneous insulin, non-monomeric"),
    ("Isc2", "pmol/kg", "subcutaneous insulin, monomeric"),
    ("Gs", "mg/kg", "subcutaneous glucose"),
]

_PARAMS = [
    _P("BW", 102.32, "kg", "body weight"),
    _P("kabs", 0.08906, "1/min", "rate constant of intestinal absorption"),
    _P("kmax", 0.046122, "1/min", "maximal rate constant of gastric emptying"),
    _P("kmin", 0.0037927, "1/min", "minimal rate constant of gastric emptying"),
    _P("b", 0.70391, "1", "fraction of the meal at which kgut has fallen to (kmax+kmin)/2 (must be < 1)"),
    _P("d", 0.21057, "1", "fraction of the meal at which kgut is back to (kmax+kmin)/2"),
    _P("Vg", 1.9152, "dL/kg", "distribution volume of glucose"),
    _P("Vi", 0.054906, "L/kg", "distribution volume of insulin"),
    _P("Vmx", 0.031319, "mg/kg/min per pmol/L", "insulin-dependent utilisation: maximal rate per unit X"),
    _P("Km0", 253.52, "mg/kg", "Michaelis-Menten constant of insulin-dependent utilisation"),
    _P("k2", 0.087114, "1/min", "rate constant Gt -> Gp"),
    _P("k1", 0.058138, "1/min", "rate constant Gp -> Gt"),
    _P("p2u", 0.027802, "1/min", "rate constant of insulin action on utilisation"),
    _P("m1", 0.15446, "1/min", "rate constant liver -> plasma insulin"),
    _P("m2", 0.225027424083, "1/min", "rate constant plasma -> liver insulin"),
    _P("m4", 0.090010969633, "1/min", "rate constant of peripheral insulin degradation"),
    _P("m30", 0.23169, "1/min", "rate constant of hepatic insulin clearance (m3, held at its basal value)"),
    _P("ki", 0.0046374, "1/min", "rate constant of the delay between insulin signal and action on production"),
    _P("kp1", 4.73140582528, "mg/kg/min", "endogenous glucose production extrapolated at zero glucose and insulin"),
    _P("kp2", 0.00469, "1/min", "liver glucose effectiveness"),
    _P("kp3", 0.01208, "mg/kg/min per pmol/L", "amplitude of insulin action on the liver"),
    _P("f", 0.9, "1", "fraction of intestinal absorption appearing in plasma"),
    _P("ke1", 0.0005, "1/min", "renal glomerular filtration rate"),
    _P("ke2", 339.0, "mg/kg", "renal threshold of glucose"),
    _P("Fsnc", 1.0, "mg/kg/min", "insulin-independent utilisation (brain, erythrocytes)"),
    _P("Vm0", 3.2667306607, "mg/kg/min", "insulin-independent part of the maximal utilisation rate"),
    _P("kd", 0.0152, "1/min", "rate constant of s.c. insulin dissociation (Isc1 -> Isc2)"),
    _P("ksc", 0.0766, "1/min", "rate constant plasma -> subcutaneous glucose"),
    _P("ka1", 0.0019, "1/min", "rate constant of non-monomeric s.c. insulin absorption"),
    _P("ka2", 0.0078, "1/min", "rate constant of monomeric s.c. insulin absorption"),
    _P("u2ss", 1.2386244136, "pmol/kg/min", "steady-state (basal) s.c. insulin infusion rate"),
    _P("Ib", 100.25, "pmol/L", "basal plasma insulin concentration"),
    *[_P(n, v, u, desc, positive=False) for n, v, u, desc in _X0],
]

# kgut's tanh branch divides by Dbar; np.where (the NumPy backend's ifelse) evaluates both branches,
# so the denominator is kept away from 0 there. Dbar is either 0 or thousands of mg, so the guard
# never changes a value that is used.
_EXPRESSIONS = [
    ("D", "1000 * CHO"),  # g/min -> mg/min
    ("uins", "insulin * 6000 / BW"),  # U/min -> pmol/kg/min
    ("Qsto", "Qsto1 + Qsto2"),
    ("Dbar", "last_Qsto + 1000 * last_foodtaken"),  # mg
    ("Dpos", "max(Dbar, 1e-9)"),
    ("aa", "5 / (2 * Dpos * (1 - b))"),
    ("cc", "5 / (2 * Dpos * d)"),
    ("kgut", "ifelse(Dbar > 0, kmin + (kmax - kmin) / 2 * (tanh(aa * (Qsto - b * Dbar)) - tanh(cc * (Qsto - d * Dbar)) + 2), kmax)"),
    ("Ra", "f * kabs * Qgut / BW"),
    ("EGP", "max(kp1 - kp2 * Gp - kp3 * Id, 0)"),
    ("Uii", "Fsnc"),
    ("Erenal", "ifelse(Gp > ke2, ke1 * (Gp - ke2), 0)"),
    ("Uid", "(Vm0 + Vmx * X) * Gt / (Km0 + Gt)"),
    ("It", "Ip / Vi"),
]

# simglucose multiplies the derivatives of Gp, Gt, Ip, Il, Isc1, Isc2, Gs by (x >= 0)
_DERIVATIVES = {
    "Qsto1": "-kmax * Qsto1 + D",
    "Qsto2": "kmax * Qsto1 - kgut * Qsto2",
    "Qgut": "kgut * Qsto2 - kabs * Qgut",
    "Gp": "ifelse(Gp >= 0, EGP + Ra - Uii - Erenal - k1 * Gp + k2 * Gt, 0)",
    "Gt": "ifelse(Gt >= 0, -Uid + k1 * Gp - k2 * Gt, 0)",
    "Ip": "ifelse(Ip >= 0, -(m2 + m4) * Ip + m1 * Il + ka1 * Isc1 + ka2 * Isc2, 0)",
    "X": "-p2u * X + p2u * (It - Ib)",
    "I1": "-ki * (I1 - It)",
    "Id": "-ki * (Id - I1)",
    "Il": "ifelse(Il >= 0, -(m1 + m30) * Il + m2 * Ip, 0)",
    "Isc1": "ifelse(Isc1 >= 0, uins - (ka1 + kd) * Isc1, 0)",
    "Isc2": "ifelse(Isc2 >= 0, kd * Isc1 - ka2 * Isc2, 0)",
    "Gs": "ifelse(Gs >= 0, -ksc * Gs + ksc * Gp, 0)",
}

UVA_PADOVA_T1D = Model(
    name="uva_padova_t1d",
    description="UVA/Padova type 1 diabetes glucose-insulin model (2008 simulator), as in simglucose 0.2.11",
    time_unit="min",
    states=[State(n, x0[0], u, desc) for (n, u, desc), x0 in zip(_STATES, _X0)],
    parameters=_PARAMS,
    inputs=[
        Input("CHO", "g/min"),
        Input("insulin", "U/min"),
        Input("last_Qsto", "mg"),
        Input("last_foodtaken", "g"),
    ],
    expressions=_EXPRESSIONS,
    derivatives=_DERIVATIVES,
    outputs=[
        Output("Gsub", "Gs / Vg", "mg/dL", "subcutaneous glucose concentration (simglucose's BG; CGM before noise)"),
        Output("Gp_conc", "Gp / Vg", "mg/dL", "plasma glucose concentration"),
        Output("I", "It", "pmol/L", "plasma insulin concentration"),
        Output("Ra", "Ra", "mg/kg/min", "rate of glucose appearance from the gut"),
        Output("EGP", "EGP", "mg/kg/min", "endogenous glucose production"),
        Output("Uid", "Uid", "mg/kg/min", "insulin-dependent glucose utilisation"),
        Output("Erenal", "Erenal", "mg/kg/min", "renal glucose excretion"),
        Output("kgut", "kgut", "1/min", "gastric emptying rate constant"),
        Output("basal_insulin", "u2ss * BW / 6000", "U/min", "basal insulin rate of simglucose's basal-bolus controller"),
    ],
    # s.c. insulin: a dose of A units over `duration` minutes is a rate A/duration U/min
    doses={"sc_insulin": InfusionTarget("insulin")},
    reference=(
        "Dalla Man, Rizza & Cobelli, IEEE Trans Biomed Eng 54(10):1740-1749, 2007 (meal model); "
        "Kovatchev et al., J Diabetes Sci Technol 3(1):44-55, 2009 (UVA/Padova T1D simulator); "
        "implementation: simglucose 0.2.11 (J. Xie, MIT licence), simglucose/patient/t1dpatient.py"
    ),
)

MODELS_HERE: list = [UVA_PADOVA_T1D]
