"""Diabetes twin: basal-bolus insulin therapy with a CGM sensor and an insulin pump, on the
UVA/Padova T1D model (`uva_padova_t1d`), reproducing simglucose 0.2.11's closed loop
(T1DSimEnv + BBController; the data and provenance are in tests/data/glucose/SOURCES.md).

Controller `basal_bolus`. The job's `[controller] period` must be 1 (minute): the patient model is
advanced one minute per kernel call, with its inputs held over the minute and the integrator
restarted, exactly as simglucose steps `T1DPatient`. The sensor samples, and the therapy acts, every
`sample_time` minutes of the chosen sensor (Dexcom 3, GuardianRT 5, Navigator 1).

One sensor step [t, t+S) in simglucose's order, S = sample time, for every minute t' in it:
  * meals announced at minute t' are added to the plate; the patient eats min(eating_rate, plate)
    g that minute (5 g/min). When eating starts (nothing eaten the minute before),
    last_Qsto = Qsto1 + Qsto2 at t' and last_foodtaken = 0; while eating, last_foodtaken grows by
    the grams eaten, including the current minute; after the meal both keep their values until the
    next meal starts (they set the gastric emptying rate kgut);
  * the pump delivers the insulin rate fixed at t (basal + bolus, after pump rounding);
  * at the end of the minute the sensor reads Gsub (= Gs/Vg) plus noise if t'+1 is a multiple of
    S, and otherwise holds its last reading.
At the end of the step (time t+S) simglucose reports
  BG  = mean of the S per-minute Gsub values at t+1 .. t+S (noise-free; simglucose's "BG"),
  CGM = mean of the S per-minute sensor readings (so with S = 3: (2 CGM(t) + CGM(t+3)) / 3),
  meal = grams announced during the step / S (g/min),
and the basal-bolus controller sets the rates for [t+S, t+2S):
  basal = u2ss * BW / 6000 U/min,
  bolus = (meal * S / CR + [CGM > 150] * (CGM - target) / CF) / S U/min   (only if meal > 0),
with the step-averaged CGM and target 140 mg/dL. A meal's bolus is thus given over the step after
the step in which the meal was announced (3-6 min after it for Dexcom). At t = 0 the controller
sees the first sensor reading and no meal.

Pump (`pump_rounding`):
  "simglucose" (default, for reproduction): what simglucose 0.2.11's InsulinPump does: each rate
    (U/min) is converted to pmol/min (x 6000), rounded to the nearest multiple of the pump's
    increment (np.round, half to even), converted back and clipped to [min, max] of
    pump_params.csv; the increment 0.05 is thus applied in pmol/min (8.3e-6 U/min): in effect no
    quantisation, and the clip (30 U/min) never acts.
  "increments": a physical pump: the bolus of a step, in U, is rounded down to a multiple of
    inc_bolus (0.05 U) and clipped to [min_bolus, max_bolus] U; the basal rate, in U/h, is
    rounded down to a multiple of inc_basal (0.05 U/h) and clipped to [min_basal, max_basal] U/h.

CGM noise (sensor_params.csv; Breton & Kovatchev, J Diabetes Sci Technol 2(5):853-862, 2008, as
simglucose implements it): a Gaussian AR(1) process e every 15 min, e_0 ~ N(0, 1),
e_j = PACF * (e_{j-1} + z_j), z_j ~ N(0, 1); its Johnson-SU transform
eps_j = xi + lambda * sinh((e_j - gamma) / delta); the 15-min values are interpolated to the
sample time by not-a-knot cubic splines, one per block of 10 intervals (150 min) through 11 knots,
consecutive blocks sharing their end knot; CGM = clip(Gsub + noise, min, max). The normals come from
engine.rng (STREAM_SENSOR, keyed by seed and patient index), so a patient's noise does not depend
on chunking; simglucose draws them from np.random.RandomState(seed), the same series for every
patient. Sample k (time k*S) uses the k-th value of the interpolated series (simglucose's first
CGM reading, at t = 0, is its second value: its environment reads the sensor twice at reset).

Meals (`meals`, `random_meals`, one plan per day, repeated daily when `repeat_daily`): fixed
[time_h, grams] pairs, and/or slots drawn per patient and day from engine.rng (STREAM_MEALS): eaten
with `probability`, at a time ~ normal(time_h, time_sd_h) truncated to [time_low_h, time_high_h]
(default time_h -/+ 2 sd), of grams ~ lognormal(median grams, sd_log grams_sd_log). Times are
rounded to the minute (half to even, as simglucose's scenario).

Carbohydrate ratio CR (g/U) and correction factor CF (mg/dL per U) per patient: by default from
the covariates CR and CF (a CSV cohort maps its Quest.csv columns there, e.g. jobs/data/
uva_padova_30.csv); `carb_ratio` / `correction_factor` may name other covariates or give one number
for all; `therapy_table` looks both up by the category of a categorical covariate (virtual cohorts
of replicated virtual patients). `cr_factor`, one per arm in [[arms]] order (or one for all),
multiplies CR: 0.8 = 20 % smaller ratio = 25 % larger meal boluses.

Endpoints (per patient, over the t_end / S step values after t = 0, like simglucose's summaries):
from BG (noise-free Gsub, step-averaged, simglucose's BG): mean_bg, sd_bg, cv_bg (100 sd/mean,
population sd), min_bg, max_bg, tir_70_180 (70 <= BG <= 180), tbr_70 (BG < 70), tbr_54 (BG < 54),
tar_180 (BG > 180), tar_250 (BG > 250), all in % of steps; mean_cgm (mean of the step-averaged
CGM); total_insulin (U delivered over [0, t_end)), total_cho (g eaten), n_boluses.

Signals (job outputs, sampled at the output times from the per-minute control times): CGM (the
sensor's current reading), insulin (U/min delivered), CHO (g/min eaten); at t_end they show the
values of t_end - 1 (no control time at t_end).

`BasalBolus.check_job(settings, loaded)` checks what the settings alone cannot (period 1, t_end a
whole number of sample times, cr_factor per arm, the CR/CF covariates or the therapy table's
categorical covariate); engine.models.check_job_against_model can call it for `twin validate`.

The model's Gsub at t_end completes the last step; the controller gets it from `finish`, which
engine.segments calls after the last segment.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator
from scipy.interpolate import CubicSpline
from scipy.special import ndtr, ndtri

from .. import rng
from ..errors import JobError
from . import ChunkContext, Controller, Settings, Signal, register

log = logging.getLogger("twin")

# Meal draws: a stream of their own, so that adding meal slots never shifts sensor noise.
STREAM_MEALS = rng.STREAM_MEALS

# simglucose 0.2.11 params/sensor_params.csv and params/pump_params.csv (MIT licence, (c) 2017
# Jinyu Xie; copies with the licence in tests/data/glucose/, checked equal by the tests)
SENSORS: dict[str, dict[str, float]] = {
    "Dexcom": dict(PACF=0.7, gamma=-0.5444, lambda_=15.9574, delta=1.6898, xi=-5.47, sample_time=3.0,
                   min=39.0, max=600.0),
    "GuardianRT": dict(PACF=0.7, gamma=-0.5444, lambda_=15.9574, delta=1.6898, xi=-5.47, sample_time=5.0,
                       min=39.0, max=600.0),
    "Navigator": dict(PACF=0.7, gamma=-0.5444, lambda_=15.9574, delta=1.6898, xi=-5.47, sample_time=1.0,
                      min=32.0, max=600.0),
}
PUMPS: dict[str, dict[str, float]] = {
    "Cozmo": dict(min_bolus=0.0, max_bolus=75.0, inc_bolus=0.05, min_basal=0.0, max_basal=35.0, inc_basal=0.05),
    "Insulet": dict(min_bolus=0.0, max_bolus=30.0, inc_bolus=0.05, min_basal=0.0, max_basal=30.0, inc_basal=0.05),
}

NOISE_KNOT_MIN = 15.0  # the noise model's sample time (min)
NOISE_BLOCK_KNOTS = 10  # knot intervals per spline block (simglucose's PRECOMPUTE)
U_TO_PMOL = 6000.0  # simglucose's pump unit conversion (U -> pmol)


# ---------------------------------------------------------------- settings
Pos = Annotated[float, Field(gt=0)]
NonNeg = Annotated[float, Field(ge=0)]


class MealSlot(Settings):
    """A randomised meal: eaten with `probability` at ~N(time_h, time_sd_h) (truncated), of lognormal size."""

    time_h: NonNeg
    grams: Pos  # median size
    time_sd_h: NonNeg = 0.0
    time_low_h: NonNeg | None = None  # truncation of the time (default time_h - 2 sd, at least 0)
    time_high_h: NonNeg | None = None  # (default time_h + 2 sd)
    grams_sd_log: NonNeg = 0.0  # sd of log(grams)
    probability: Annotated[float, Field(gt=0, le=1)] = 1.0

    @model_validator(mode="after")
    def _bounds(self):
        lo, hi = self.bounds()
        if not lo <= self.time_h <= hi:
            raise ValueError(f"time_h={self.time_h} must lie in [time_low_h, time_high_h] = [{lo}, {hi}]")
        if self.time_sd_h > 0 and not lo < hi:
            raise ValueError(f"time_low_h={lo} must be < time_high_h={hi}")
        return self

    def bounds(self) -> tuple[float, float]:
        lo = self.time_low_h if self.time_low_h is not None else max(self.time_h - 2 * self.time_sd_h, 0.0)
        hi = self.time_high_h if self.time_high_h is not None else self.time_h + 2 * self.time_sd_h
        return lo, hi


class TherapyTable(Settings):
    """CR and CF per category of a categorical covariate (in the covariate's category order)."""

    covariate: str
    CR: Annotated[list[Pos], Field(min_length=1)]
    CF: Annotated[list[Pos], Field(min_length=1)]

    @model_validator(mode="after")
    def _same(self):
        if len(self.CR) != len(self.CF):
            raise ValueError(f"CR has {len(self.CR)} entries, CF {len(self.CF)}")
        return self


class BasalBolusSettings(Settings):
    sensor: Literal["Dexcom", "GuardianRT", "Navigator"] = "Dexcom"
    sensor_noise: bool = True
    pump: Literal["Cozmo", "Insulet"] = "Insulet"
    pump_rounding: Literal["simglucose", "increments"] = "simglucose"
    meals: list[list[float]] = Field(default_factory=list)  # [time_h, grams]
    random_meals: list[MealSlot] = Field(default_factory=list)
    repeat_daily: bool = True
    eating_rate: Pos = 5.0  # g/min
    carb_ratio: Pos | str = "CR"  # g/U: a number, or the covariate holding it
    correction_factor: Pos | str = "CF"  # mg/dL per U
    therapy_table: TherapyTable | None = None
    target: Pos = 140.0  # mg/dL
    correction_threshold: Pos = 150.0  # mg/dL: correction bolus only when CGM is above
    cr_factor: Annotated[list[Pos], Field(min_length=1)] = Field(default_factory=lambda: [1.0])

    @model_validator(mode="after")
    def _meals(self):
        for i, m in enumerate(self.meals):
            if len(m) != 2:
                raise ValueError(f"meals[{i}] = {m} must be [time_h, grams]")
            if not (m[0] >= 0 and m[1] > 0):
                raise ValueError(f"meals[{i}] = {m}: time_h must be >= 0 and grams > 0")
            if self.repeat_daily and m[0] >= 24:
                raise ValueError(f"meals[{i}] = {m}: time_h must be < 24 with repeat_daily (a daily plan)")
        if self.repeat_daily:
            for i, s in enumerate(self.random_meals):
                if s.bounds()[1] >= 24:
                    raise ValueError(f"random_meals[{i}]: latest time {s.bounds()[1]} h must be < 24 with repeat_daily")
        if not self.meals and not self.random_meals:
            raise ValueError("give 'meals' and/or 'random_meals' (an empty meal plan has no boluses to test)")
        if self.therapy_table is not None and (self.carb_ratio != "CR" or self.correction_factor != "CF"):
            raise ValueError("give either therapy_table or carb_ratio/correction_factor, not both")
        return self


# ---------------------------------------------------------------- pump
def pump_rates(basal: np.ndarray, bolus: np.ndarray, pump: dict, rounding: str, step_min: float):
    """Delivered (basal, bolus) rates in U/min from requested rates in U/min over a step of `step_min`."""
    basal = np.asarray(basal, float)
    bolus = np.asarray(bolus, float)
    if rounding == "simglucose":
        def q(x, inc, lo, hi):  # simglucose 0.2.11 InsulinPump: increment applied in pmol/min
            x = np.round(x * U_TO_PMOL / inc) * inc
            return np.maximum(np.minimum(x / U_TO_PMOL, hi), lo)

        return (q(basal, pump["inc_basal"], pump["min_basal"], pump["max_basal"]),
                q(bolus, pump["inc_bolus"], pump["min_bolus"], pump["max_bolus"]))
    # a physical pump: bolus amount (U) and basal rate (U/h) rounded down to their increments; the
    # 1e-9 guards against x/inc landing just below an integer by floating-point error
    amount = np.floor(bolus * step_min / pump["inc_bolus"] + 1e-9) * pump["inc_bolus"]
    amount = np.clip(amount, pump["min_bolus"], pump["max_bolus"])
    per_h = np.floor(basal * 60.0 / pump["inc_basal"] + 1e-9) * pump["inc_basal"]
    per_h = np.clip(per_h, pump["min_basal"], pump["max_basal"])
    return per_h / 60.0, amount / step_min


# ---------------------------------------------------------------- CGM noise
def johnson_su(e: np.ndarray, p: dict) -> np.ndarray:
    return p["xi"] + p["lambda_"] * np.sinh((e - p["gamma"]) / p["delta"])


def spline_weights(sample_time: float) -> np.ndarray:
    """[n, 11]: the not-a-knot cubic spline through 11 knots 15 min apart, at sample_time, 2*sample_time,
    .., 150 min, as a linear map of the knot values."""
    span = NOISE_KNOT_MIN * NOISE_BLOCK_KNOTS
    n = int(math.floor(span / sample_time))
    knots = np.arange(NOISE_BLOCK_KNOTS + 1) * NOISE_KNOT_MIN
    t = np.arange(1, n + 1) * sample_time
    W = CubicSpline(knots, np.eye(NOISE_BLOCK_KNOTS + 1), bc_type="not-a-knot")(t)
    on_knot = np.isclose(t[:, None], knots[None, :], rtol=0, atol=1e-9)
    W[on_knot.any(axis=1)] = on_knot[on_knot.any(axis=1)]  # exactly the knot value there (no 1e-16 residue)
    return W


class CgmNoise:
    """The CGM noise series of each patient, sample by sample (sample k at time k * sample_time)."""

    def __init__(self, params: dict, seed: int, index: np.ndarray, stream: int = rng.STREAM_SENSOR):
        self.p = params
        self.seed, self.index, self.stream = seed, np.asarray(index, np.int64), stream
        self.W = spline_weights(params["sample_time"])
        self.per_block = self.W.shape[0]
        self.block = -1
        self.values = None  # [m, per_block] of the current block
        self.e = None  # AR(1) state at the block's last knot
        self.eps = None  # Johnson-SU value of that knot

    def knots(self, b: int) -> np.ndarray:
        """[m, 11] Johnson-SU knot values of block b (blocks must be visited in order)."""
        K = NOISE_BLOCK_KNOTS
        # draw d of the patient's sensor stream is z_d; knot j of block b is e_{K b + j}
        if b == 0:
            z = rng.normal(self.seed, self.stream, self.index, K + 1)
            e = np.empty_like(z)
            e[:, 0] = z[:, 0]
        else:
            z = np.concatenate([np.zeros((len(self.index), 1)),
                                rng.normal(self.seed, self.stream, self.index, K, offset=K * b + 1)], axis=1)
            e = np.empty_like(z)
            e[:, 0] = self.e
        for j in range(1, K + 1):
            e[:, j] = self.p["PACF"] * (e[:, j - 1] + z[:, j])
        eps = johnson_su(e, self.p)
        if b > 0:
            eps[:, 0] = self.eps  # the shared knot, bit for bit
        self.e, self.eps = e[:, -1].copy(), eps[:, -1].copy()
        return eps

    def __call__(self, k: int) -> np.ndarray:
        b, pos = divmod(k, self.per_block)
        while self.block < b:
            self.block += 1
            self.values = self.knots(self.block) @ self.W.T
        if b < self.block:
            raise ValueError("noise samples must be requested in order")
        return self.values[:, pos]

    def series(self, n: int) -> np.ndarray:
        return np.stack([self(k) for k in range(n)], axis=1)


# ---------------------------------------------------------------- meals
def meal_plan(s: BasalBolusSettings, seed: int, index: np.ndarray, t_end: float) -> tuple[np.ndarray, np.ndarray]:
    """Announced meals per patient: (minute [m, n], grams [m, n]); not eaten: minute = -1."""
    m = len(index)
    n_days = max(1, math.ceil(t_end / 1440.0)) if s.repeat_daily else 1
    minutes, grams = [], []
    for d in range(n_days):
        for t_h, g in s.meals:
            minutes.append(np.full(m, float(np.round(t_h * 60.0)) + 1440.0 * d))
            grams.append(np.full(m, float(g)))
    n_slots = len(s.random_meals)
    if n_slots:
        # draws: day d, slot j -> (take, time, size) at 3 * (d * n_slots + j) + 0, 1, 2
        u = rng.uniform(seed, STREAM_MEALS, index, 3 * n_slots * n_days)
        for d in range(n_days):
            for j, slot in enumerate(s.random_meals):
                c = 3 * (d * n_slots + j)
                take = u[:, c] < slot.probability
                if slot.time_sd_h > 0:
                    lo, hi = slot.bounds()
                    a, b = ndtr((lo - slot.time_h) / slot.time_sd_h), ndtr((hi - slot.time_h) / slot.time_sd_h)
                    z = ndtri(a + u[:, c + 1] * (b - a))
                    t_h = np.clip(slot.time_h + slot.time_sd_h * z, lo, hi)
                else:
                    t_h = np.full(m, slot.time_h)
                size = slot.grams * np.exp(slot.grams_sd_log * ndtri(u[:, c + 2]))
                minutes.append(np.where(take, np.round(t_h * 60.0) + 1440.0 * d, -1.0))
                grams.append(np.where(take, size, 0.0))
    return np.stack(minutes, axis=1), np.stack(grams, axis=1)


# ---------------------------------------------------------------- controller
@register
class BasalBolus(Controller):
    name = "basal_bolus"
    Settings = BasalBolusSettings
    models = ("uva_padova_t1d",)
    observe = ["Gsub"]
    signals = {
        "CGM": Signal("mg/dL", "CGM sensor reading (with noise, clipped; held between samples)"),
        "insulin": Signal("U/min", "insulin delivered by the pump (basal + bolus, after pump rounding)"),
        "CHO": Signal("g/min", "carbohydrate eaten"),
    }
    results = {
        "mean_bg": Signal("mg/dL", "mean BG (step-averaged Gsub, noise-free)"),
        "sd_bg": Signal("mg/dL", "standard deviation of BG (population)"),
        "cv_bg": Signal("%", "coefficient of variation of BG"),
        "min_bg": Signal("mg/dL", "minimum BG"),
        "max_bg": Signal("mg/dL", "maximum BG"),
        "tir_70_180": Signal("%", "time in range: 70 <= BG <= 180 mg/dL"),
        "tbr_70": Signal("%", "time below range: BG < 70 mg/dL"),
        "tbr_54": Signal("%", "time below range: BG < 54 mg/dL"),
        "tar_180": Signal("%", "time above range: BG > 180 mg/dL"),
        "tar_250": Signal("%", "time above range: BG > 250 mg/dL"),
        "mean_cgm": Signal("mg/dL", "mean CGM (step-averaged sensor readings)"),
        "total_insulin": Signal("U", "insulin delivered"),
        "total_cho": Signal("g", "carbohydrate eaten"),
        "n_boluses": Signal("1", "boluses given (steps with a meal bolus)"),
    }

    def __init__(self, settings: BasalBolusSettings, period: float, ctx: ChunkContext):
        super().__init__(settings, period, ctx)
        s = settings
        if period != 1.0:
            raise JobError(f"key 'controller.period' = {period}: controller 'basal_bolus' steps the patient "
                           "every minute; set period = 1.0 (the sensor sample time comes from the sensor)")
        self.sensor = SENSORS[s.sensor]
        self.S = int(self.sensor["sample_time"])
        if not float(ctx.t_end).is_integer():
            raise JobError(f"the last output time {ctx.t_end} min must be a whole number of minutes")
        m = len(ctx.index)
        self.m = m
        model = ctx.model
        self.iQ1, self.iQ2 = model.state_names.index("Qsto1"), model.state_names.index("Qsto2")
        self.uCHO, self.uINS, self.uQ, self.uF = (model.input_names.index(n) for n in
                                                  ("CHO", "insulin", "last_Qsto", "last_foodtaken"))
        self.basal = ctx.param("u2ss") * ctx.param("BW") / 6000.0  # U/min
        self.cr, self.cf = self._therapy(s, ctx)
        f = np.asarray(s.cr_factor, float)
        if len(f) > 1:
            arm = np.maximum(ctx.arm, 0)  # -1: not randomised (not run)
            if arm.size and int(arm.max()) >= len(f):
                raise JobError(f"key 'controller.settings.cr_factor' has {len(f)} entries, one per arm; "
                               f"arm index {int(arm.max())} has none")
            self.cr = self.cr * f[arm]
        else:
            self.cr = self.cr * f[0]
        self.noise = CgmNoise(self.sensor, ctx.seed, ctx.index) if s.sensor_noise else None
        self.meal_min, self.meal_g = meal_plan(s, ctx.seed, ctx.index, ctx.t_end)
        # per-patient simulation state (simglucose's T1DPatient / T1DSimEnv / BBController)
        z = lambda: np.zeros(m)  # noqa: E731
        self.plate, self.last_cho, self.last_qsto, self.last_food = z(), z(), z(), z()
        self.eating = np.zeros(m, bool)
        self.cgm_last, self.cgm_obs = z(), z()  # held sensor reading; step-averaged CGM the controller sees
        self.acc_bg, self.acc_cgm, self.acc_meal = z(), z(), z()
        self.rate = z()  # insulin delivered over the current step, U/min
        self.total_insulin, self.total_cho, self.n_boluses = z(), z(), z()
        self.bg_steps: list[np.ndarray] = []
        self.cgm_steps: list[np.ndarray] = []
        self.sig_cgm: list[np.ndarray] = []
        self.sig_ins: list[np.ndarray] = []
        self.sig_cho: list[np.ndarray] = []
        self.finished = False

    @classmethod
    def check_job(cls, settings: BasalBolusSettings, loaded) -> None:
        """Checks that need the whole job (arms, cohort, output times), for `twin validate`."""
        job, src = loaded.job, loaded.path
        ctl = job.controller
        if ctl.period != 1.0:
            raise JobError(f"{src}: key 'controller.period' = {ctl.period}: controller 'basal_bolus' steps the "
                           "patient every minute; set period = 1.0 (the sensor sets the sampling)")
        S = SENSORS[settings.sensor]["sample_time"]
        t_end = float(job.outputs.time_values()[-1])
        if not t_end.is_integer() or t_end % S:
            raise JobError(f"{src}: the last output time {t_end} min must be a whole number of {settings.sensor} "
                           f"sample times ({S:g} min)")
        if len(settings.cr_factor) not in (1, len(job.arms)):
            raise JobError(f"{src}: key 'controller.settings.cr_factor' has {len(settings.cr_factor)} entries; "
                           f"give one, or one per arm ({len(job.arms)})")
        coh = job.cohort
        cats = {k: d.categories for k, d in coh.covariates.items() if getattr(d, "categories", None)}
        names = set(coh.covariates)
        if coh.csv is not None:
            names |= set(coh.csv.covariates)
            cats.update({k: c.categories for k, c in coh.csv.covariates.items() if c.categories})
        tt = settings.therapy_table
        if tt is not None:
            if tt.covariate not in cats:
                raise JobError(f"{src}: key 'controller.settings.therapy_table.covariate' = {tt.covariate!r}: not a "
                               f"categorical covariate of the cohort ({', '.join(sorted(cats)) or 'none'})")
            if len(cats[tt.covariate]) != len(tt.CR):
                raise JobError(f"{src}: key 'controller.settings.therapy_table': {len(tt.CR)} CR/CF entries for the "
                               f"{len(cats[tt.covariate])} categories of {tt.covariate!r}")
            return
        for key in ("carb_ratio", "correction_factor"):
            v = getattr(settings, key)
            if isinstance(v, str) and (v not in names or v in cats):
                raise JobError(f"{src}: key 'controller.settings.{key}' = {v!r}: no such continuous covariate in the "
                               f"cohort ({', '.join(sorted(names)) or 'none'}); map a CSV column in "
                               "[cohort.csv.covariates], give a number, or use therapy_table")

    # -- therapy parameters
    def _therapy(self, s: BasalBolusSettings, ctx: ChunkContext) -> tuple[np.ndarray, np.ndarray]:
        m = len(ctx.index)
        if s.therapy_table is not None:
            tt = s.therapy_table
            code = self._covariate(ctx, tt.covariate, "therapy_table.covariate")
            if not np.issubdtype(code.dtype, np.integer):
                raise JobError(f"key 'controller.settings.therapy_table.covariate' = {tt.covariate!r}: "
                               "must be a categorical covariate")
            if (code >= len(tt.CR)).any():
                raise JobError(f"key 'controller.settings.therapy_table': {len(tt.CR)} CR/CF entries but "
                               f"covariate {tt.covariate!r} has category code {int(code.max())}")
            ok = code >= 0  # -1: invalid covariate, the patient has failed already
            c = np.where(ok, code, 0)
            return (np.where(ok, np.asarray(tt.CR)[c], np.nan), np.where(ok, np.asarray(tt.CF)[c], np.nan))
        out = []
        for key in ("carb_ratio", "correction_factor"):
            v = getattr(s, key)
            if not isinstance(v, str):
                out.append(np.full(m, float(v)))
                continue
            x = self._covariate(ctx, v, key).astype(float)
            # NaN already: a covariate the cohort rejected (the patient has failed). A value <= 0 or
            # infinite becomes NaN too: that patient's first bolus is NaN and the kernel fails it
            # (status nonfinite); the others run on.
            bad = (x <= 0) | np.isinf(x)
            if bad.any():
                log.warning("controller basal_bolus: %d patient(s) of the chunk at patient %d have covariate %s <= 0 or infinite; "
                            "they fail at their first bolus", int(bad.sum()), int(ctx.index[0]), v)
                x = np.where(bad, np.nan, x)
            out.append(x)
        return out[0], out[1]

    @staticmethod
    def _covariate(ctx: ChunkContext, name: str, key: str) -> np.ndarray:
        if name not in ctx.covariates:
            raise JobError(f"key 'controller.settings.{key}' = {name!r}: no such covariate in the cohort "
                           f"(covariates: {', '.join(sorted(ctx.covariates)) or 'none'}); map the CSV column "
                           "in [cohort.csv.covariates] or give a number")
        return np.asarray(ctx.covariates[name])

    # -- framework hooks
    def control_times(self) -> np.ndarray:
        return np.arange(0.0, self.ctx.t_end, 1.0)

    def cgm_noise(self, k: int) -> np.ndarray:
        """Noise of sensor sample k (time k * S), [m]; zero with sensor_noise = false."""
        return self.noise(k) if self.noise is not None else np.zeros(self.m)

    def _measure(self, t: int, gsub: np.ndarray) -> None:
        """The end of the minute ending at t: sensor reading and step accumulators."""
        S = self.S
        if t % S == 0:
            cgm = gsub + self.cgm_noise(t // S)
            self.cgm_last = np.minimum(np.maximum(cgm, self.sensor["min"]), self.sensor["max"])
        if t > 0:
            self.acc_bg += gsub / S
            self.acc_cgm += self.cgm_last / S
            if t % S == 0:  # a step ends: simglucose's BG/CGM record and the controller's observation
                self.bg_steps.append(self.acc_bg)
                self.cgm_steps.append(self.acc_cgm)
                self.cgm_obs = self.acc_cgm
        else:
            self.cgm_obs = self.cgm_last.copy()

    def act(self, t, y, u, obs, alive):
        ti = int(round(t))
        S = self.S
        self._measure(ti, obs["Gsub"])
        if ti % S == 0:  # basal-bolus policy at the start of a step, from the step just ended
            meal = self.acc_meal
            cgm = self.cgm_obs
            bolus_u = np.where(meal > 0, (meal * S) / self.cr
                               + (cgm > self.s.correction_threshold) * (cgm - self.s.target) / self.cf, 0.0)
            basal_q, bolus_q = pump_rates(self.basal, bolus_u / S, PUMPS[self.s.pump], self.s.pump_rounding, S)
            self.rate = basal_q + bolus_q
            self.n_boluses += bolus_q > 0
            self.acc_bg, self.acc_cgm, self.acc_meal = np.zeros(self.m), np.zeros(self.m), np.zeros(self.m)
        # meals announced this minute, then eating (simglucose's T1DPatient.step)
        ann = np.where(self.meal_min == ti, self.meal_g, 0.0).sum(axis=1)
        self.acc_meal += ann / S
        self.plate += ann
        to_eat = np.where(self.plate > 0, np.minimum(self.s.eating_rate, self.plate), 0.0)
        self.plate = np.maximum(self.plate - to_eat, 0.0)
        start = (to_eat > 0) & (self.last_cho <= 0)
        self.last_qsto = np.where(start, y[self.iQ1] + y[self.iQ2], self.last_qsto)
        self.last_food = np.where(start, 0.0, self.last_food)
        self.eating |= start
        self.last_food = np.where(self.eating, self.last_food + to_eat, self.last_food)
        self.eating &= ~((to_eat <= 0) & (self.last_cho > 0))
        self.last_cho = to_eat
        u[self.uCHO] = to_eat
        u[self.uINS] = self.rate
        u[self.uQ] = self.last_qsto
        u[self.uF] = self.last_food
        self.total_insulin += self.rate
        self.total_cho += to_eat
        if ti % S == 0:  # the reading and the rate change only at sample times: stored once per step
            self.sig_cgm.append(self.cgm_last)
            self.sig_ins.append(self.rate)
        self.sig_cho.append(to_eat)

    def finish(self, t, y, u, obs, alive):  # noqa: ARG002
        """After the last segment, with the observations at t_end."""
        if not self.finished:
            self._measure(int(round(t)), obs["Gsub"])
            self.finished = True

    def signal_values(self):
        n = len(self.sig_cho)  # control times so far
        f = lambda v: np.stack(v, axis=1) if v else np.zeros((self.m, 0))  # noqa: E731
        held = lambda v: np.repeat(f(v), self.S, axis=1)[:, :n]  # noqa: E731
        return {"CGM": held(self.sig_cgm), "insulin": held(self.sig_ins), "CHO": f(self.sig_cho)}

    def result_values(self):
        if not self.bg_steps:
            nan = np.full(self.m, np.nan)
            return {k: nan for k in self.results}
        bg = np.stack(self.bg_steps, axis=1)
        mean = bg.mean(axis=1)
        sd = bg.std(axis=1)
        pct = lambda mask: 100.0 * mask.mean(axis=1)  # noqa: E731
        return {
            "mean_bg": mean,
            "sd_bg": sd,
            "cv_bg": 100.0 * sd / mean,
            "min_bg": bg.min(axis=1),
            "max_bg": bg.max(axis=1),
            "tir_70_180": pct((bg >= 70) & (bg <= 180)),
            "tbr_70": pct(bg < 70),
            "tbr_54": pct(bg < 54),
            "tar_180": pct(bg > 180),
            "tar_250": pct(bg > 250),
            "mean_cgm": np.stack(self.cgm_steps, axis=1).mean(axis=1),
            "total_insulin": self.total_insulin.copy(),
            "total_cho": self.total_cho.copy(),
            "n_boluses": self.n_boluses.copy(),
        }
