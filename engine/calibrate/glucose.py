"""Synthetic type 1 diabetes twins on the UVA/Padova model: a day of meals, insulin and CGM.

Virtual patients are adult#001 (the model defaults) with log-normal variability on a few
parameters (`VARIED`); their truth is known, which is what parameter-recovery tests and the
forecasting benchmark need. Therapy: basal insulin at the model's steady-state rate u2ss, meals
eaten at 5 g/min (as simglucose) with a bolus of grams/CR units over one minute at meal start
(`bolus_factor` > 1 over-boluses, which is how the benchmark produces hypoglycaemia). Gastric
emptying uses kgut = kmax throughout (inputs last_Qsto = last_foodtaken = 0, see
engine/models/glucose.py): the same model generates and fits the data.

CGM: Gsub (= Gs/Vg) every `sample_min` minutes plus the Breton & Kovatchev (2008) sensor noise as
engine.controllers.diabetes implements it (autocorrelated Johnson-SU), clipped to the sensor range.
"""

from __future__ import annotations

import numpy as np

from kernels.ode.integrate_numpy import EVENT_INPUT, Events

from ..controllers.diabetes import SENSORS, CgmNoise
from ..models import get_model

MODEL = get_model("uva_padova_t1d")
VARIED = {"Vmx": 0.3, "kp2": 0.25, "kabs": 0.3, "kp3": 0.2}  # sd of log
MEALS = ((60.0, 50.0), (360.0, 70.0), (720.0, 60.0), (1140.0, 30.0))  # (minute, grams)
CR = 15.0  # g of carbohydrate per unit of insulin


def basal_rate(P: np.ndarray) -> np.ndarray:
    pn = MODEL.parameter_names
    return P[pn.index("u2ss")] * P[pn.index("BW")] / 6000.0  # pmol/kg/min -> U/min


def population(n: int, seed: int, sd_scale: float = 1.0) -> np.ndarray:
    """[n_params, n] parameter matrix of n virtual patients (PCG64 `seed`)."""
    rng = np.random.default_rng(seed)
    P = np.array([[p.default] * n for p in MODEL.parameters], float)
    for k, (name, sd) in enumerate(VARIED.items()):
        P[MODEL.parameter_names.index(name)] *= np.exp(sd * sd_scale * rng.standard_normal(n))
    return P


def therapy_events(P: np.ndarray, bolus_factor: np.ndarray | float = 1.0, meals=MEALS) -> Events:
    """Basal from t=0, meals (CHO on/off) and meal boluses, per patient."""
    m = P.shape[1]
    ii, ci = MODEL.input_names.index("insulin"), MODEL.input_names.index("CHO")
    bf = np.broadcast_to(np.asarray(bolus_factor, float), (m,))
    rows = [(np.zeros(m), ii, basal_rate(P))]
    for t, g in meals:
        dur = g / 5.0
        rows += [(np.full(m, t), ci, np.full(m, 5.0)), (np.full(m, t + dur), ci, np.full(m, -5.0))]
        bol = g / CR * bf  # U, delivered over 1 min
        rows += [(np.full(m, t), ii, bol), (np.full(m, t + 1.0), ii, -bol)]
    tt = np.stack([r[0] for r in rows])
    gg = np.stack([np.full(m, r[1], np.int16) for r in rows])
    vv = np.stack([np.broadcast_to(r[2], (m,)) for r in rows]).astype(float)
    order = np.argsort(tt, axis=0, kind="stable")
    take = lambda a: np.ascontiguousarray(np.take_along_axis(a, order, axis=0))  # noqa: E731
    return Events(take(tt), np.full(tt.shape, EVENT_INPUT, np.int8), take(gg).astype(np.int16), take(vv))


def cgm_noise(n_samples: int, m: int, seed: int, sensor: str = "GuardianRT") -> np.ndarray:
    """[m, n_samples] sensor noise (mg/dL) of patients 0..m-1."""
    return CgmNoise(SENSORS[sensor], seed, np.arange(m, dtype=np.int64)).series(n_samples)


def clip_cgm(g: np.ndarray, sensor: str = "GuardianRT") -> np.ndarray:
    s = SENSORS[sensor]
    return np.clip(g, s["min"], s["max"])


def write_cgm_dataset(out, n: int = 6, seed: int = 17, hours: float = 12.0, bolus_factors=None) -> dict:
    """Long CSV of CGM readings (every 5 min), meals (g), meal boluses (U) and the basal rate
    (U/min) of `n` synthetic twins, plus a consent registry; returns the truth."""
    from pathlib import Path

    from kernels.compile import ode_kernel
    from kernels.ode.integrate_numpy import SolverOptions

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    P = population(n, seed)
    bf = np.ones(n) if bolus_factors is None else np.asarray(bolus_factors, float)
    meals = tuple((t, g) for t, g in MEALS if t < hours * 60)
    ev = therapy_events(P, bf, meals)
    times = np.arange(5.0, hours * 60 + 1e-9, 5.0)
    g, st = ode_kernel(MODEL, "cpu").run(P, ev, times, SolverOptions(rtol=1e-6, atol=1e-8), ["Gsub"],
                                         np.zeros(n, np.int8))
    cgm = clip_cgm(g[0] + cgm_noise(len(times), n, seed + 1))
    basal = basal_rate(P)
    rows = ["patient,time,variable,value,unit"]
    for i in range(n):
        pid = f"t1d-{i:03d}"
        rows.append(f"{pid},0,basal,{basal[i]:.10g},U/min")
        for t, gr in meals:
            rows.append(f"{pid},{t:g},carbs,{gr:g},g")
            rows.append(f"{pid},{t:g},bolus,{gr / CR * bf[i]:.10g},U")
        rows += [f"{pid},{t:g},cgm,{v:.1f},mg/dL" for t, v in zip(times, cgm[i])]
    (out / "cgm_stream.csv").write_text("\n".join(rows) + "\n")
    (out / "cgm_patients.csv").write_text("id,consent\n" + "".join(f"t1d-{i:03d},true\n" for i in range(n)))
    return {"P": P, "glucose": g[0], "cgm": cgm, "times": times}
