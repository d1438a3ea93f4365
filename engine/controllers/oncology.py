"""`chemo_adapt`: cycled chemotherapy with per-twin dose adaptation from neutrophil counts, and
tumour-response endpoints, for the oncology models (engine/models/oncology.py).

Schedule. Cycle k (k = 0 .. n_cycles-1) is due at first_dose for k = 0 and `cycle_length` hours
after the previous cycle was actually given otherwise. Each cycle gives every drug of `drugs`
(to the arms it names) at the current dose level × its planned dose (× the covariate
`dose_covariate`, e.g. body-surface area, when set): a bolus at the due time, or an infusion at
rate dose/duration over [due, due + duration]. Doses go in as events at their exact times, so
due times need not fall on control times. Arms are named by 0-based index into the job's [[arms]]
(`adapt_arms`, `drugs[].arms`). Routes, durations, arm indices and `dose_covariate` are checked
against the model and the job when the job is loaded (`check_job`: `twin validate`, `twin run`).

Blood counts. At every control time (job `[controller] period`, e.g. 6 h) the controller reads ANC
(the model's Circ) — the value just before anything happens at that time — and keeps the nadir of
the current cycle (since its last dose) and of the whole course. Grades follow CTCAE v5 for
"neutrophil count decreased": grade 1 < LLN (`anc_lln`), 2 < 1.5, 3 < 1.0, 4 < 0.5 × 10^9/L. A grade
between two control times is not seen, as a count between two blood draws is not.

Rules (patients of `adapt_arms` only; other arms get every cycle on time at full dose). The
decision for a cycle due in [t, t + period) is taken at control time t from the count at t — the
pre-cycle blood draw:
* delay (`delay_below`, e.g. 1.5): from the second cycle on, if ANC < delay_below the cycle is
  postponed by `delay_step` hours and decided again then; a cycle already postponed `max_delays`
  times that would need another postponement is not given and treatment stops (discontinued).
* reduction (`reduce_after_grade4`, e.g. 0.25): when a cycle is given, if a count after the
  previous dose, up to and including the pre-cycle count, was below `grade4_below` (0.5) — in at
  least `grade4_min_duration` hours' worth of counts (each count stands for one control period;
  0: any count below) — the dose level is multiplied by (1 - reduce_after_grade4) from this
  cycle on; reductions accumulate (1 → 0.75 → 0.56, much as the docetaxel label's
  100 → 75 → 60 mg/m^2).
* floor (`min_dose_fraction`, e.g. 0.5): a cycle whose dose level would fall below this fraction of
  the planned dose is not given and treatment stops (discontinued).
The first cycle is given on time at full dose whatever the count.

Tumour response (all arms), RECIST-like on the model's tumour size W: baseline at t = 0; scans at
multiples of `scan_interval` (at the first control time at or after each; every control time when
not set). The measure is W itself (`response_measure = "size"`) or the equivalent diameter W^(1/3)
(`"diameter"`, for which the RECIST 1.1 diameter thresholds are meant). At each scan, in this order:
CR if W <= cr_fraction × baseline W; PD if measure >= (1 + pd_change) × nadir (the smallest measure
so far, baseline included); PR if measure <= (1 + pr_change) × baseline; SD otherwise. Best response
is the best category up to and including the first PD (no confirmation scans, no minimum SD
duration). Time to progression is the time of the first PD scan; a patient without PD is censored
at the last scan (`ttp` = that time, `progressed` = 0). Defaults: pr_change -0.30, pd_change +0.20,
cr_fraction 0.01.

Results per patient (biomarkers/): dose_intensity (delivered dose / n_cycles full planned doses,
summed over drugs; cycles that do not start before the end of the simulation count as not
delivered), cycles_given, n_reductions, n_delays, discontinued (0/1), worst_grade (0-4),
grade3plus and grade4 (0/1, for incidence), grade4_cycles (cycles whose counts after the dose
reached grade 4: shows the effect of adaptation, which cannot act before cycle 2), anc_nadir,
tumour_pct_change (measure at the last scan vs baseline), tumour_best_pct_change, best_response
(1 CR, 2 PR, 3 SD, 4 PD), ttp, progressed (0/1).
Signals (per control time, held to the output times): chemo_dose (mg of the first drug started in
the control period), dose_level, cycles_started, anc_grade.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from kernels.ode.integrate_numpy import EVENT_INPUT, EVENT_STATE, Events
from kernels.ode.model import BolusTarget

from ..segments import cut_events
from . import Controller, Settings, Signal, register

Pos = Annotated[float, Field(gt=0)]
NonNeg = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]

BEST_RESPONSE = {1: "CR", 2: "PR", 3: "SD", 4: "PD"}
_EPS = 1e-9  # time comparisons (h)


class Drug(Settings):
    route: str  # a dose route of the model (onco_combo: iv_infusion / iv_infusion_B, ...)
    dose: Pos  # planned dose per cycle, mg (or mg per unit of dose_covariate)
    duration: Pos | None = None  # infusion duration (h); infusion routes only
    arms: list[Annotated[int, Field(ge=0)]] | None = None  # arm indices (0-based) given this drug; None: all


class ChemoSettings(Settings):
    cycle_length: Pos  # h
    n_cycles: Annotated[int, Field(ge=1, le=1000)]
    first_dose: NonNeg = 0.0  # h
    drugs: Annotated[list[Drug], Field(min_length=1)]
    dose_covariate: str | None = None  # planned dose × this covariate (e.g. "bsa" for mg/m^2 doses)
    adapt_arms: list[Annotated[int, Field(ge=0)]] | None = None  # arms where the rules act; None: all
    reduce_after_grade4: Fraction = 0.25
    grade4_below: Pos = 0.5  # 10^9/L
    grade4_min_duration: NonNeg = 0.0  # h below grade4_below since the last dose before reducing
    delay_below: Pos | None = 1.5  # 10^9/L; None: never delay
    delay_step: Pos = 168.0  # h
    max_delays: Annotated[int, Field(ge=0)] = 2  # per cycle; one more and treatment stops
    min_dose_fraction: Fraction = 0.5
    anc_lln: Pos = 2.0  # lower limit of normal (grade 1), 10^9/L
    scan_interval: Pos | None = None  # h; None: every control time
    response_measure: Literal["size", "diameter"] = "size"
    pr_change: Annotated[float, Field(gt=-1, lt=0)] = -0.30
    pd_change: Pos = 0.20
    cr_fraction: Fraction = 0.01

    @model_validator(mode="after")
    def _check(self):
        if not self.grade4_below < 1.0 < 1.5 < self.anc_lln:
            raise ValueError(f"need grade4_below < 1.0 < 1.5 < anc_lln (CTCAE grades), got grade4_below="
                             f"{self.grade4_below}, anc_lln={self.anc_lln}")
        for i, d in enumerate(self.drugs):
            if d.duration is not None and d.duration > self.cycle_length:
                raise ValueError(f"drugs[{i}].duration = {d.duration} is longer than cycle_length = "
                                 f"{self.cycle_length}")
        return self


def ctcae_grade(anc: np.ndarray, lln: float = 2.0) -> np.ndarray:
    """CTCAE v5 grade of 'neutrophil count decreased' for ANC in 10^9/L (NaN stays 0)."""
    a = np.asarray(anc, float)
    g = np.zeros(a.shape)
    for k, thr in enumerate((lln, 1.5, 1.0, 0.5), start=1):
        g[a < thr] = k
    return g


@register
class ChemoAdapt(Controller):
    name = "chemo_adapt"
    Settings = ChemoSettings
    models = ("onco_simeoni_friberg", "onco_combo")
    observe = ["ANC", "W"]
    signals = {
        "chemo_dose": Signal("mg", "dose of the first drug started in the control period"),
        "dose_level": Signal("1", "current dose level (1 = planned dose, 0 after discontinuation)"),
        "cycles_started": Signal("1", "cycles given so far"),
        "anc_grade": Signal("1", "CTCAE v5 neutropenia grade of the ANC at the control time"),
    }
    results = {
        "dose_intensity": Signal("1", "delivered dose / planned dose (n_cycles at full dose)"),
        "cycles_given": Signal("1", "cycles given"),
        "n_reductions": Signal("1", "cycles given at a reduced level after grade-4 neutropenia"),
        "n_delays": Signal("1", "cycle delays because ANC < delay_below"),
        "discontinued": Signal("1", "1 if treatment stopped early (dose floor or too many delays)"),
        "worst_grade": Signal("1", "worst CTCAE v5 neutropenia grade seen (0-4)"),
        "grade3plus": Signal("1", "1 if grade 3 or 4 neutropenia was seen"),
        "grade4": Signal("1", "1 if grade 4 neutropenia was seen"),
        "grade4_cycles": Signal("1", "cycles with grade 4 neutropenia (a count < grade4_below after the dose)"),
        "anc_nadir": Signal("10^9/L", "lowest ANC seen at control times"),
        "tumour_pct_change": Signal("%", "change of the response measure at the last scan from baseline"),
        "tumour_best_pct_change": Signal("%", "largest decrease (most negative change) of the response measure"),
        "best_response": Signal("1", "best overall response: 1 CR, 2 PR, 3 SD, 4 PD"),
        "ttp": Signal("h", "time to progression (first PD scan), or last scan time if censored"),
        "progressed": Signal("1", "1 if PD was seen (ttp is an event), 0 if censored"),
    }

    @classmethod
    def check_job(cls, settings: ChemoSettings, loaded) -> None:
        from ..errors import JobError
        from ..models import job_model

        job, src, s = loaded.job, loaded.path, settings
        model = job_model(loaded)
        n_arms = len(job.arms)
        for i, d in enumerate(s.drugs):
            where = f"controller.settings.drugs[{i}]"
            if d.route not in model.doses:
                raise JobError(f"{src}: key '{where}.route' = {d.route!r}: {model.name} accepts "
                               f"{', '.join(model.doses)}")
            bolus = isinstance(model.doses[d.route], BolusTarget)
            if bolus and d.duration is not None:
                raise JobError(f"{src}: key '{where}.duration': route {d.route!r} is a bolus and takes no duration")
            if not bolus and d.duration is None:
                raise JobError(f"{src}: key '{where}': route {d.route!r} is an infusion and needs 'duration'")
            bad = [a for a in (d.arms or []) if a >= n_arms]
            if bad:
                raise JobError(f"{src}: key '{where}.arms' = {d.arms}: arm indices are 0-based and the job has "
                               f"{n_arms} arm(s)")
        bad = [a for a in (s.adapt_arms or []) if a >= n_arms]
        if bad:
            raise JobError(f"{src}: key 'controller.settings.adapt_arms' = {s.adapt_arms}: arm indices are 0-based "
                           f"and the job has {n_arms} arm(s)")
        if s.dose_covariate is not None:
            coh = job.cohort
            cont = {k for k, d in coh.covariates.items() if not getattr(d, "categories", None)}
            if coh.csv is not None:
                cont |= {k for k, c in coh.csv.covariates.items() if not c.categories}
            if s.dose_covariate not in cont:
                raise JobError(f"{src}: key 'controller.settings.dose_covariate' = {s.dose_covariate!r}: not a "
                               f"continuous covariate of the cohort; available: {', '.join(sorted(cont)) or 'none'}")

    def __init__(self, settings: ChemoSettings, period: float, ctx):
        super().__init__(settings, period, ctx)

        s, model = settings, ctx.model
        m = len(ctx.index)
        arm = np.asarray(ctx.arm, np.int64)
        scale = np.ones(m)
        if s.dose_covariate is not None:  # checked by check_job: present and continuous
            scale = np.asarray(ctx.covariates[s.dose_covariate], float)
        # per drug: event kind, target index, planned amount per patient [m] (0 where not given)
        self.drug_plan = []
        for i, d in enumerate(s.drugs):
            tgt = model.doses[d.route]  # route and duration checked by check_job
            bolus = isinstance(tgt, BolusTarget)
            frac = ctx.param(tgt.fraction) if tgt.fraction else np.ones(m)
            given = np.ones(m, bool) if d.arms is None else np.isin(arm, d.arms)
            amount = np.where(given, d.dose * scale, 0.0)
            kind = EVENT_STATE if bolus else EVENT_INPUT
            index = model.state_names.index(tgt.state) if bolus else model.input_names.index(tgt.input)
            self.drug_plan.append((kind, index, amount, frac, d.duration))
        self.adaptive = np.ones(m, bool) if s.adapt_arms is None else np.isin(arm, s.adapt_arms)
        self.planned_total = s.n_cycles * sum(p[2] for p in self.drug_plan)  # [m]

        # schedule state
        self.next_due = np.full(m, float(s.first_dose))
        self.cycles = np.zeros(m, np.int64)
        self.level = np.ones(m)
        self.delays_now = np.zeros(m, np.int64)
        self.n_delays = np.zeros(m, np.int64)
        self.n_reductions = np.zeros(m, np.int64)
        self.g4_cycles = np.zeros(m, np.int64)
        self.discontinued = np.zeros(m, bool)
        self.delivered = np.zeros(m)
        self.cycle_min = np.full(m, np.inf)  # ANC nadir since the last dose
        self.cycle_g4_time = np.zeros(m)  # time below grade4_below since the last dose (control periods)
        self.anc_min = np.full(m, np.inf)
        self.given_at: list[list[float]] = [[] for _ in range(m)]  # dose times per patient
        self.level_at: list[list[float]] = [[] for _ in range(m)]  # dose level of each given cycle
        self.delayed_at: list[list[float]] = [[] for _ in range(m)]  # control times of delays
        self.pending: list[tuple[np.ndarray, int, int, np.ndarray]] = []  # (time [m], kind, target, value [m])
        # tumour
        self.base = np.full(m, np.nan)
        self.base_w = np.full(m, np.nan)
        self.nadir = np.full(m, np.nan)
        self.last_change = np.full(m, np.nan)
        self.best_change = np.full(m, np.nan)
        self.best = np.full(m, np.nan)
        self.ttp = np.full(m, np.nan)
        self.progressed = np.zeros(m, bool)
        self.n_scans = np.zeros(m, np.int64)
        self.next_scan = float(s.scan_interval) if s.scan_interval else 0.0
        # signals
        self.sig: dict[str, list[np.ndarray]] = {k: [] for k in self.signals}

    # ---------------------------------------------------------------- helpers
    def _measure(self, w: np.ndarray) -> np.ndarray:
        w = np.maximum(np.asarray(w, float), 0.0)
        return np.cbrt(w) if self.s.response_measure == "diameter" else w

    def _give(self, who: np.ndarray, t_due: np.ndarray) -> np.ndarray:
        """Schedule every drug's dose for patients `who` at times t_due; returns mg of drug 0."""
        first = np.zeros(len(who))
        for j, (kind, index, amount, frac, duration) in enumerate(self.drug_plan):
            dose = np.where(who, amount * self.level, 0.0)
            give = who & (dose > 0)
            if j == 0:
                first = dose
            if not give.any():
                continue
            self.delivered += dose
            on = np.where(give, t_due, np.inf)
            if kind == EVENT_STATE:
                self.pending.append((on, EVENT_STATE, index, dose * frac))
            else:
                rate = dose / duration * frac
                self.pending.append((on, EVENT_INPUT, index, rate))
                self.pending.append((np.where(give, t_due + duration, np.inf), EVENT_INPUT, index, -rate))
        for i in np.nonzero(who)[0]:
            self.given_at[i].append(float(t_due[i]))
            self.level_at[i].append(float(self.level[i]))
        self.cycles += who
        self.next_due = np.where(who, t_due + self.s.cycle_length, self.next_due)
        self.delays_now[who] = 0
        return first

    # ---------------------------------------------------------------- controller API
    def act(self, t, y, u, obs, alive):
        s = self.s
        anc = np.asarray(obs["ANC"], float)
        w = np.asarray(obs["W"], float)
        # the count at t closes the window of the cycle given last (each count stands for one period)
        self.cycle_min = np.fmin(self.cycle_min, anc)
        self.cycle_g4_time += np.where(anc < s.grade4_below, self.period, 0.0)
        self.anc_min = np.fmin(self.anc_min, anc)
        self._tumour(t, w)

        active = ~self.discontinued & (self.cycles < s.n_cycles) & (self.next_due < self.ctx.t_end - _EPS)
        due = active & (self.next_due < t + self.period - _EPS)
        t_due = np.maximum(self.next_due, t)
        first_cycle = self.cycles == 0
        adapt = self.adaptive & ~first_cycle

        # delays: adaptive patients, from the second cycle, count below the threshold
        low = due & adapt & (anc < s.delay_below) if s.delay_below is not None else np.zeros_like(due)
        too_many = low & (self.delays_now >= s.max_delays)  # would need one postponement too many: stop
        self.discontinued |= too_many
        delay = low & ~too_many
        self.delays_now += delay
        self.n_delays += delay
        for i in np.nonzero(delay)[0]:
            self.delayed_at[i].append(float(t))
        self.next_due = np.where(delay, self.next_due + s.delay_step, self.next_due)
        go = due & ~low

        # reduction after grade 4 since the last dose, then the dose floor
        g4 = go & adapt & (self.cycle_min < s.grade4_below) & (self.cycle_g4_time + _EPS >= s.grade4_min_duration)
        new_level = np.where(g4, self.level * (1.0 - s.reduce_after_grade4), self.level)
        floor = go & adapt & (new_level < s.min_dose_fraction - 1e-12)
        self.discontinued |= floor
        go &= ~floor
        reduced = go & (new_level < self.level)
        self.level = np.where(go, new_level, self.level)
        self.n_reductions += reduced

        self.g4_cycles += go & (self.cycles > 0) & (self.cycle_min < s.grade4_below)  # closes the last window
        first = self._give(go, t_due)
        # a new window opens at the dose: counts after t
        self.cycle_min = np.where(go, np.inf, self.cycle_min)
        self.cycle_g4_time = np.where(go, 0.0, self.cycle_g4_time)

        self.sig["chemo_dose"].append(first)
        self.sig["dose_level"].append(np.where(self.discontinued, 0.0, self.level))
        self.sig["cycles_started"].append(self.cycles.astype(float))
        self.sig["anc_grade"].append(ctcae_grade(anc, s.anc_lln))

    def _tumour(self, t: float, w: np.ndarray) -> None:
        s = self.s
        meas = self._measure(w)
        if t <= _EPS:
            self.base, self.base_w, self.nadir = meas.copy(), np.maximum(w, 0.0), meas.copy()
            return
        if s.scan_interval is not None:
            if t < self.next_scan - _EPS:
                return
            while self.next_scan <= t + _EPS:
                self.next_scan += s.scan_interval
        change = meas / self.base - 1.0
        self.n_scans += 1
        self.last_change = 100.0 * change
        self.best_change = np.fmin(self.best_change, 100.0 * change)
        open_ = ~self.progressed
        cat = np.full(len(w), 3.0)
        cat[meas <= (1.0 + s.pr_change) * self.base] = 2.0
        pd = meas >= (1.0 + s.pd_change) * self.nadir
        cat[pd] = 4.0
        cat[np.maximum(w, 0.0) <= s.cr_fraction * self.base_w] = 1.0
        new_pd = open_ & (cat == 4.0)
        self.best = np.where(open_, np.fmin(self.best, cat), self.best)
        self.ttp = np.where(new_pd, t, np.where(open_, t, self.ttp))
        self.progressed |= new_pd
        self.nadir = np.fmin(self.nadir, meas)

    def events(self, t0, t1):
        if not self.pending:
            return None
        m = len(self.ctx.index)
        tt = np.vstack([p[0] for p in self.pending])
        kk = np.vstack([np.full(m, p[1], np.int8) for p in self.pending])
        gg = np.vstack([np.full(m, p[2], np.int16) for p in self.pending])
        vv = np.vstack([np.broadcast_to(p[3], (m,)) for p in self.pending])
        # drop rows with nothing left at or after t1
        self.pending = [p for p in self.pending if np.any(np.isfinite(p[0]) & (p[0] >= t1))]
        return cut_events(Events(tt, kk, gg, vv), t0, t1)

    def signal_values(self):
        return {k: np.stack(v, axis=1) for k, v in self.sig.items()}

    def result_values(self):
        g = ctcae_grade(self.anc_min, self.s.anc_lln)
        with np.errstate(invalid="ignore", divide="ignore"):
            di = np.where(self.planned_total > 0, self.delivered / self.planned_total, np.nan)
        scanned = self.n_scans > 0
        open_g4 = (self.cycles > 0) & (self.cycle_min < self.s.grade4_below)  # the last cycle's window
        return {
            "dose_intensity": di,
            "cycles_given": self.cycles.astype(float),
            "n_reductions": self.n_reductions.astype(float),
            "n_delays": self.n_delays.astype(float),
            "discontinued": self.discontinued.astype(float),
            "worst_grade": g,
            "grade3plus": (g >= 3).astype(float),
            "grade4": (g >= 4).astype(float),
            "grade4_cycles": (self.g4_cycles + open_g4).astype(float),
            "anc_nadir": self.anc_min,
            "tumour_pct_change": self.last_change,
            "tumour_best_pct_change": self.best_change,
            "best_response": self.best,
            "ttp": np.where(scanned, self.ttp, np.nan),
            "progressed": np.where(scanned, self.progressed.astype(float), np.nan),
        }
