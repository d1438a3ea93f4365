"""Classic small ODE models: the Lorenz system (ensemble / integrator benchmark) and Bergman's
minimal model of the intravenous glucose tolerance test (IVGTT).
"""

from kernels.ode.model import Model, Output, Parameter, State

# States are upper-case because the generated kernels name their own arrays t, y, p, u, dy (and
# kernels/ode/sbml.py treats those names as reserved): a state called `y` would shadow the state array.
LORENZ = Model(
    name="lorenz",
    description="Lorenz (1963) convection model; chaotic at sigma=10, rho=28, beta=8/3 (ensemble benchmark)",
    time_unit="1",
    states=[
        State("X", "X0", "1", "convective intensity (Lorenz's x)"),
        State("Y", "Y0", "1", "horizontal temperature difference (Lorenz's y)"),
        State("Z", "Z0", "1", "vertical temperature-profile distortion (Lorenz's z)"),
    ],
    parameters=[
        Parameter("sigma", 10.0, "1", "Prandtl number"),
        Parameter("rho", 28.0, "1", "Rayleigh number relative to its critical value"),
        Parameter("beta", 8.0 / 3.0, "1", "geometric factor"),
        Parameter("X0", 1.0, "1", "initial X", positive=False),
        Parameter("Y0", 0.0, "1", "initial Y", positive=False),
        Parameter("Z0", 0.0, "1", "initial Z", positive=False),
    ],
    derivatives={
        "X": "sigma * (Y - X)",
        "Y": "X * (rho - Z) - Y",
        "Z": "X * Y - beta * Z",
    },
    outputs=[Output("r", "sqrt(X * X + Y * Y + Z * Z)", "1", "distance from the origin")],
    reference="E. N. Lorenz, Deterministic nonperiodic flow, J Atmos Sci 20(2):130-141, 1963",
)

# Time t is minutes since the intravenous glucose bolus: the insulin secretion term
# gamma * max(G - h, 0) * t grows with the time elapsed since the stimulus, so a simulation of this
# model must start at the injection (G(0) = G0, the theoretical glucose just after the bolus).
BERGMAN_MINIMAL = Model(
    name="bergman_minimal",
    description="Bergman minimal model of the IVGTT: glucose, remote insulin action, plasma insulin with "
    "time-dependent second-phase secretion",
    time_unit="min",
    states=[
        State("G", "G0", "mg/dL", "plasma glucose concentration"),
        State("X", 0.0, "1/min", "remote insulin action on glucose disappearance"),
        State("I", "I0", "µU/mL", "plasma insulin concentration"),
    ],
    parameters=[
        Parameter("p1", 3.082e-2, "1/min", "glucose effectiveness SG (insulin-independent disappearance)"),
        Parameter("p2", 2.093e-2, "1/min", "rate constant of remote insulin action decay"),
        Parameter("p3", 1.062e-5, "1/min^2 per µU/mL", "insulin-dependent increase of remote insulin action"),
        Parameter("Gb", 92.0, "mg/dL", "basal (pre-injection) plasma glucose"),
        Parameter("Ib", 7.3, "µU/mL", "basal (pre-injection) plasma insulin"),
        Parameter("n", 0.3, "1/min", "fractional insulin clearance"),
        Parameter("gamma", 3.349e-3, "µU/mL/min^2 per mg/dL", "second-phase pancreatic responsivity"),
        Parameter("h", 89.5, "mg/dL", "glucose threshold of insulin secretion"),
        Parameter("G0", 287.0, "mg/dL", "glucose just after the bolus (t = 0)"),
        Parameter("I0", 403.4, "µU/mL", "insulin at t = 0 (first-phase peak)"),
    ],
    derivatives={
        "G": "-(p1 + X) * G + p1 * Gb",
        "X": "-p2 * X + p3 * (I - Ib)",
        "I": "gamma * max(G - h, 0) * t - n * (I - Ib)",
    },
    outputs=[
        Output("SI", "p3 / p2", "1/min per µU/mL", "insulin sensitivity index"),
        Output("SG", "p1", "1/min", "glucose effectiveness"),
    ],
    reference=(
        "Bergman, Ider, Bowden & Cobelli, Am J Physiol 236:E667-E677, 1979 (glucose minimal model); "
        "Bergman, Phillips & Cobelli, J Clin Invest 68:1456-1467, 1981 (insulin kinetics, secretion "
        "gamma [G - h]+ t); coupled form as fitted to IVGTT data, with insulin relaxing to Ib: "
        "De Gaetano & Arino, J Math Biol 40:136-168, 2000, eqs (1)-(3) (Bergman 1981 wrote -n I). Defaults: an "
        "illustrative normal subject (MINMOD-era values widely quoted in teaching material)"
    ),
)

MODELS_HERE: list = [LORENZ, BERGMAN_MINIMAL]
