"""Job files: TOML validated by pydantic, in one place.

Every error names the key (dotted path), the bad value and what is allowed. Unknown keys are
rejected. Nothing in a job file is evaluated: only numbers, strings and lists are read.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import JobError

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]
Pos = Annotated[float, Field(gt=0)]
NonNeg = Annotated[float, Field(ge=0)]


class Strict(BaseModel):
    # strict: "12" or true is not a number; TOML already gives real types, so nothing valid is lost
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True, populate_by_name=True)


# ---------------------------------------------------------------- job / solver
class JobSection(Strict):
    name: Name
    description: str = ""
    seed: Annotated[int, Field(ge=0, lt=2**63)]
    chunk_size: Annotated[int, Field(ge=1, le=10_000_000)] = 1000
    backend: Literal["auto", "numpy", "cpu", "cuda"] = "auto"


class SolverSection(Strict):
    # dopri5: adaptive explicit 5(4); rk4: fixed step; rodas4: adaptive stiff Rosenbrock 4(3) with the
    # generated analytic Jacobian; rush_larsen: fixed step, exponential update of gating states
    method: Literal["dopri5", "rk4", "rodas4", "rush_larsen"] = "dopri5"
    rtol: Annotated[float, Field(gt=0, lt=1)] = 1e-8
    # one absolute tolerance, or one per state: { A_central = 1e-9, default = 1e-12 }
    atol: Annotated[float, Field(gt=0)] | dict[str, Annotated[float, Field(gt=0)]] = 1e-10
    max_steps: Annotated[int, Field(ge=1)] = 1_000_000
    dt: Pos = 0.01  # fixed step (rk4 only), in the model's time unit
    first_step: Pos | None = None
    # float32 runs the compiled kernels in single precision: ~1e-5 relative error floor (measured,
    # tests/test_float32.py), so only sensible with rtol >= 1e-4; the numpy backend is float64 only
    precision: Literal["float64", "float32"] = "float64"

    @model_validator(mode="after")
    def _prec(self):
        if self.precision == "float32" and self.rtol < 1e-5:
            raise ValueError(f"precision 'float32' cannot reach rtol={self.rtol}; use rtol >= 1e-5 or float64")
        return self


class ModelSection(Strict):
    name: Name  # a library model, or the name given to a model read from `file`
    file: str | None = None  # TOML (.toml), SBML (.xml/.sbml), CellML (.cellml) or Myokit (.mmt), relative to the job
    parameters: dict[str, float] = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        for k, x in v.items():
            if not math.isfinite(x):
                raise ValueError(f"parameter {k!r} must be a finite number, got {x}")
        return v


# ---------------------------------------------------------------- cohort
class NormalDist(Strict):
    distribution: Literal["normal"]
    mean: float
    sd: Pos
    low: float | None = None  # truncation bounds (optional)
    high: float | None = None
    unit: str = ""

    @model_validator(mode="after")
    def _bounds(self):
        _check_bounds(self.low, self.high)
        return self


class LogNormalDist(Strict):
    distribution: Literal["lognormal"]
    median: Pos
    sd_log: Pos  # standard deviation of log(x)
    low: float | None = None
    high: float | None = None
    unit: str = ""

    @model_validator(mode="after")
    def _bounds(self):
        _check_bounds(self.low, self.high)
        if self.high is not None and self.high <= 0:
            raise ValueError(f"high={self.high} must be > 0 for a log-normal")
        return self


class UniformDist(Strict):
    distribution: Literal["uniform"]
    low: float
    high: float
    unit: str = ""

    @model_validator(mode="after")
    def _bounds(self):
        _check_bounds(self.low, self.high)
        return self


class CategoricalDist(Strict):
    distribution: Literal["categorical"]
    categories: Annotated[list[Name], Field(min_length=1)]
    probabilities: Annotated[list[NonNeg], Field(min_length=1)]
    unit: str = ""

    @model_validator(mode="after")
    def _probs(self):
        if len(self.categories) != len(self.probabilities):
            raise ValueError(
                f"categories has {len(self.categories)} entries but probabilities has "
                f"{len(self.probabilities)}"
            )
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories {self.categories} contain duplicates")
        s = sum(self.probabilities)
        if abs(s - 1.0) > 1e-9:
            raise ValueError(f"probabilities {self.probabilities} sum to {s}, must sum to 1")
        return self


class ConstantDist(Strict):
    distribution: Literal["constant"]
    value: float
    unit: str = ""


Distribution = Annotated[
    Union[NormalDist, LogNormalDist, UniformDist, CategoricalDist, ConstantDist],
    Field(discriminator="distribution"),
]


def _check_bounds(low: float | None, high: float | None) -> None:
    if low is not None and high is not None and not low < high:
        raise ValueError(f"low={low} must be < high={high}")


def _check_matrix(m: list[list[float]], n: int, what: str, unit_diag: bool) -> None:
    shown = repr(m) if len(repr(m)) <= 80 else repr(m)[:77] + "..."
    widths = {len(row) for row in m}
    if len(widths) > 1:
        i = next(i for i, row in enumerate(m) if len(row) != len(m[0]))
        raise ValueError(f"{what} = {shown}: rows differ in length (row {i} has {len(m[i])} entries); expected {n}x{n}")
    if (len(m), widths.pop() if widths else 0) != (n, n):
        raise ValueError(f"{what} = {shown} must be {n}x{n}, got shape [{len(m)}, {len(m[0]) if m else 0}]")
    a = np.asarray(m, dtype=float)
    if not np.allclose(a, a.T, rtol=0, atol=1e-12):
        raise ValueError(f"{what} = {shown} must be symmetric")
    d = np.diag(a)
    if unit_diag and not np.allclose(d, 1.0, rtol=0, atol=1e-12):
        raise ValueError(f"{what} = {shown} must have ones on the diagonal, has {d.tolist()}")
    if unit_diag and np.any(np.abs(a) > 1 + 1e-12):
        raise ValueError(f"{what} = {shown}: entries must lie in [-1, 1]")
    if not unit_diag and np.any(d < 0):
        raise ValueError(f"{what} = {shown}: variances on the diagonal must be >= 0, has {d.tolist()}")
    if n and np.linalg.eigvalsh(a).min() < -1e-10:
        raise ValueError(f"{what} = {shown} must be positive semi-definite (smallest eigenvalue {np.linalg.eigvalsh(a).min():.3g})")


class Correlation(Strict):
    """Gaussian-copula correlation between continuous covariates."""

    variables: Annotated[list[Name], Field(min_length=2)]
    matrix: list[list[float]]

    @model_validator(mode="after")
    def _m(self):
        if len(set(self.variables)) != len(self.variables):
            raise ValueError(f"variables {self.variables} contain duplicates")
        _check_matrix(self.matrix, len(self.variables), "matrix", unit_diag=True)
        return self


class Variability(Strict):
    """Inter-individual variability: P_i = P_typ * exp(eta_i), eta ~ N(0, omega)."""

    parameters: Annotated[list[Name], Field(min_length=1)]
    omega: list[list[float]]

    @model_validator(mode="after")
    def _m(self):
        if len(set(self.parameters)) != len(self.parameters):
            raise ValueError(f"parameters {self.parameters} contain duplicates")
        _check_matrix(self.omega, len(self.parameters), "omega", unit_diag=False)
        return self


class CovariateEffect(Strict):
    """Covariate model on a typical parameter value.

    power:       P *= (cov / reference) ** exponent       (allometric scaling: exponent 0.75 / 1)
    linear:      P *= 1 + slope * (cov - reference)
    exponential: P *= exp(slope * (cov - reference))
    categorical: P *= factors[category]
    """

    parameter: Name
    covariate: Name
    model: Literal["power", "linear", "exponential", "categorical"]
    reference: float | None = None  # > 0 for power; any value (e.g. 0 for a centred covariate) otherwise
    exponent: float | None = None
    slope: float | None = None
    factors: dict[str, Pos] | None = None

    @model_validator(mode="after")
    def _fields(self):
        need = {
            "power": ("reference", "exponent"),
            "linear": ("reference", "slope"),
            "exponential": ("reference", "slope"),
            "categorical": ("factors",),
        }[self.model]
        for k in need:
            if getattr(self, k) is None:
                raise ValueError(f"model={self.model!r} needs '{k}'")
        if self.model == "power" and self.reference <= 0:
            raise ValueError(f"reference={self.reference} must be > 0 for a power model")
        return self


class CsvColumn(Strict):
    column: str
    unit: str = ""
    categories: list[Name] | None = None  # categorical covariate: allowed values in the CSV


class CsvCohort(Strict):
    path: str
    id_column: str
    consent_column: str
    key_env: str = "TWIN_PSEUDONYM_KEY"
    key_file: str | None = None
    covariates: dict[Name, CsvColumn] = Field(default_factory=dict)
    parameters: dict[Name, CsvColumn] = Field(default_factory=dict)  # individual values


class CalibratedCohort(Strict):
    """The twins of a `twin calibrate` run as the cohort (engine.calibrate.cohort_source)."""

    run: str  # run directory (or its RUN.h5) of a calibration
    draws: Annotated[int, Field(ge=0, le=10_000)] = 0  # 0: MAP estimates; K: K posterior draws per twin


class CohortSection(Strict):
    size: Annotated[int, Field(ge=1, le=2**40)] | None = None
    covariates: dict[Name, Distribution] = Field(default_factory=dict)
    correlation: Correlation | None = None
    variability: Variability | None = None
    covariate_effects: list[CovariateEffect] = Field(default_factory=list)
    csv: CsvCohort | None = None
    calibrated: CalibratedCohort | None = None

    @model_validator(mode="after")
    def _source(self):
        if self.calibrated is not None:
            extra = [k for k in ("size", "csv", "correlation", "variability") if getattr(self, k) is not None]
            extra += [k for k in ("covariates", "covariate_effects") if getattr(self, k)]
            if extra:
                raise ValueError(f"[cohort.calibrated] is the whole cohort: remove {extra}")
            return self
        if self.csv is None and self.size is None:
            raise ValueError("give either 'size' (virtual cohort) or a [cohort.csv] table")
        if self.csv is not None and self.size is not None:
            raise ValueError("'size' and [cohort.csv] are exclusive: a CSV cohort has one patient per row")
        if self.csv is not None and self.covariates:
            raise ValueError("[cohort.covariates] cannot be combined with [cohort.csv]; map CSV columns in [cohort.csv.covariates]")
        known = set(self.covariates) | (set(self.csv.covariates) if self.csv else set())
        if self.correlation is not None:
            for i, v in enumerate(self.correlation.variables):
                if v not in self.covariates:
                    raise ValueError(f"correlation.variables[{i}] = {v!r} is not a declared covariate ({sorted(self.covariates)})")
                if isinstance(self.covariates[v], (CategoricalDist, ConstantDist)):
                    raise ValueError(f"correlation.variables[{i}] = {v!r} must be a continuous covariate")
        for i, e in enumerate(self.covariate_effects):
            if e.covariate not in known:
                raise ValueError(f"covariate_effects[{i}].covariate = {e.covariate!r} is not a covariate ({sorted(known)})")
        return self


# ---------------------------------------------------------------- arms / doses
class Dose(Strict):
    amount: Pos
    route: Name  # a route the model declares (pk models: iv_bolus, iv_infusion, oral)
    time: NonNeg = 0.0  # first dose
    interval: Pos | None = None
    count: Annotated[int, Field(ge=1, le=100_000)] = 1
    duration: Pos | None = None  # infusion only
    unit: str = "mg"

    @model_validator(mode="after")
    def _route(self):
        # whether a route is an infusion is the model's business (engine.models checks it)
        if self.count > 1 and self.interval is None:
            raise ValueError(f"count={self.count} needs 'interval'")
        if self.duration is not None and self.interval is not None and self.duration > self.interval:
            raise ValueError(f"duration={self.duration} is longer than interval={self.interval}")
        return self

    def times(self) -> np.ndarray:
        return self.time + (self.interval or 0.0) * np.arange(self.count, dtype=float)


class Arm(Strict):
    name: Name
    allocation: Pos = 1.0
    doses: list[Dose] = Field(default_factory=list)


# ---------------------------------------------------------------- outputs
class TimeGrid(Strict):
    start: NonNeg = 0.0
    stop: Pos
    step: Pos

    @model_validator(mode="after")
    def _g(self):
        if self.stop <= self.start:
            raise ValueError(f"stop={self.stop} must be > start={self.start}")
        if (self.stop - self.start) / self.step > 10_000_000:
            raise ValueError("more than 10^7 sample times")
        return self

    def values(self) -> np.ndarray:
        n = int(math.floor((self.stop - self.start) / self.step + 1e-9)) + 1
        return self.start + self.step * np.arange(n, dtype=float)


class Biomarker(Strict):
    name: Name
    variable: Name
    statistic: Literal["max", "min", "mean", "last", "argmax", "argmin", "auc", "time_above"]
    threshold: float | None = None  # for time_above

    @model_validator(mode="after")
    def _t(self):
        if self.statistic == "time_above" and self.threshold is None:
            raise ValueError("statistic 'time_above' needs 'threshold'")
        return self


class OutputsSection(Strict):
    times: TimeGrid | Annotated[list[NonNeg], Field(min_length=1)]
    variables: Annotated[list[Name], Field(min_length=1)]
    biomarkers: list[Biomarker] = Field(default_factory=list)

    @field_validator("biomarkers")
    @classmethod
    def _bm_names(cls, v):
        names = [b.name for b in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"biomarker names must be unique; repeated: {dup}")
        return v

    @field_validator("times")
    @classmethod
    def _inc(cls, v):
        if isinstance(v, list) and any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("sample times must be strictly increasing")
        return v

    def time_values(self) -> np.ndarray:
        return self.times.values() if isinstance(self.times, TimeGrid) else np.asarray(self.times, float)


class Criterion(Strict):
    """One screening rule on a covariate: a range (min/max, inclusive) or a set of categories."""

    covariate: Name
    min: float | None = None
    max: float | None = None
    categories: list[Name] | None = Field(default=None, alias="in")

    @model_validator(mode="after")
    def _one(self):
        if self.categories is None and self.min is None and self.max is None:
            raise ValueError("give 'min', 'max' or 'in'")
        if self.categories is not None and (self.min is not None or self.max is not None):
            raise ValueError("'in' (categories) cannot be combined with 'min'/'max'")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min={self.min} > max={self.max}")
        return self


class TrialSection(Strict):
    """Trial design: screening, randomisation to arms, and subgroups for the analysis."""

    # simple: each patient's arm from its own random stream; stratified: permuted blocks within
    # strata (combinations of the `strata` covariates, continuous ones cut at `subgroups` bands)
    randomisation: Literal["simple", "stratified"] = "simple"
    strata: list[Name] = Field(default_factory=list)
    block_size: Annotated[int, Field(ge=1, le=1000)] | None = None  # default: one of each arm (× weights)
    inclusion: list[Criterion] = Field(default_factory=list)  # all must hold
    exclusion: list[Criterion] = Field(default_factory=list)  # any excludes
    subgroups: dict[Name, list[float] | bool] = Field(default_factory=dict)  # band edges, or true for categorical
    primary: Name | None = None  # biomarker compared between arms (forest plot)
    reference_arm: Name | None = None

    @model_validator(mode="after")
    def _strata(self):
        if self.randomisation == "stratified" and not self.strata:
            raise ValueError("randomisation 'stratified' needs 'strata'")
        if self.randomisation == "simple" and (self.strata or self.block_size):
            raise ValueError("'strata'/'block_size' need randomisation = 'stratified'")
        for k, v in self.subgroups.items():
            if isinstance(v, list) and (len(v) < 2 or any(b <= a for a, b in zip(v, v[1:]))):
                raise ValueError(f"subgroups.{k} = {v}: band edges must be >= 2 increasing numbers")
            if v is False:
                raise ValueError(f"subgroups.{k} = false: omit the key instead")
        return self


class SlurmSection(Strict):
    """Resources for `twin submit` (engine.submit); the command line overrides each key."""

    nodes: Annotated[int, Field(ge=1, le=100_000)] | None = None
    ntasks_per_node: Annotated[int, Field(ge=1, le=100_000)] | None = None
    gpus_per_task: Annotated[int, Field(ge=0, le=64)] | None = None  # > 0 picks the GPU template
    cpus_per_task: Annotated[int, Field(ge=1, le=100_000)] | None = None
    time: Annotated[str, Field(pattern=r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})$")] | None = None
    signal_seconds: Annotated[int, Field(ge=1, le=65535)] | None = None  # SIGTERM this long before the limit
    partition: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.,\-]{1,128}$")] | None = None
    account: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,128}$")] | None = None


class ControllerSection(Strict):
    """A controller acting during the simulation (engine.controllers), e.g. insulin dosing."""

    name: Name
    period: Pos  # control period, in the model's time unit
    settings: dict = Field(default_factory=dict)  # validated by the controller's own model


class PacingSection(Strict):
    """Cardiac cells (engine/cell_screen.py): every cell is paced to a control steady state, then
    paced under each screen condition from that state; the last beat is measured."""

    cycle_length: Pos  # ms between stimuli
    prepace_beats: Annotated[int, Field(ge=0, le=1_000_000)] = 1000  # control pacing per cell
    prepace_tol: Pos | None = None  # stop control pacing once every cell's beat-to-beat change <= this
    beats: Annotated[int, Field(ge=1, le=1_000_000)] = 1000  # beats under each condition; the last is measured
    amplitude: float | None = None  # stimulus current (model units, signed); default: the model's
    duration: Pos | None = None  # ms; default: the model's
    # the measured beat is sampled every fine_step for fine_span after the stimulus (upstroke),
    # then every coarse_step; each sample is an integrator stop, so this sets most of the cost of
    # a short run (0.1 ms steps cost ~5x the 0.5 ms default; APD90 differs by < 0.01 ms)
    fine_step: Pos = 0.01
    fine_span: Pos = 20.0
    coarse_step: Pos = 0.5
    # population calibration by acceptance (Britton et al. 2013): a cell is accepted when every
    # named control-beat biomarker lies in its [min, max] range, e.g. { APD90 = [180, 440] }
    accept: dict[Name, Annotated[list[float], Field(min_length=2, max_length=2)]] = Field(default_factory=dict)

    @field_validator("accept")
    @classmethod
    def _ranges(cls, v):
        for k, (lo, hi) in v.items():
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"accept.{k} = [{lo}, {hi}]: need finite min < max")
        return v


class ScreenSection(Strict):
    """Drug conditions applied to every cell: simple pore block of channel conductances,
    g = g0 / (1 + (C / IC50)^h), at multiples of each drug's free therapeutic concentration."""

    drugs: str  # CSV relative to the job: drug, set, TdP_risk, EFTPC_nM, <channel>_IC50_nM, <channel>_hill
    multiples: Annotated[list[Pos], Field(min_length=1)]  # of EFTPC
    channels: Annotated[dict[Name, Name], Field(min_length=1)]  # CSV channel -> model parameter it scales
    select: list[Name] | None = None  # run only these drugs (default: every row)
    control: bool = True  # also run each cell without drug
    metric_multiples: Annotated[list[Pos], Field(min_length=1)] = [1.0, 2.0, 3.0, 4.0]  # qNet mean over these

    @field_validator("multiples")
    @classmethod
    def _inc_mult(cls, v):
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("multiples must be strictly increasing")
        return v


# ---------------------------------------------------------------- job
class Job(Strict):
    job: JobSection
    model: ModelSection
    solver: SolverSection = SolverSection()
    cohort: CohortSection
    arms: Annotated[list[Arm], Field(min_length=1)]
    outputs: OutputsSection
    controller: ControllerSection | None = None
    slurm: SlurmSection | None = None  # `twin submit` resources (not used by `twin run`)
    trial: TrialSection | None = None
    pacing: PacingSection | None = None  # a cardiac-cell job: paced cells instead of dosed patients
    screen: ScreenSection | None = None  # drug conditions for a pacing job

    @model_validator(mode="after")
    def _pacing(self):
        if self.screen is not None and self.pacing is None:
            raise ValueError("a [screen] needs a [pacing] section (screens run paced cardiac cells)")
        if self.pacing is not None:
            if self.controller is not None:
                raise ValueError("a [pacing] job takes no [controller]")
            if any(a.doses for a in self.arms) or len(self.arms) != 1:
                raise ValueError("a [pacing] job has one arm without doses (drug conditions go in [screen])")
            if self.pacing.accept and self.screen is not None and not self.screen.control:
                raise ValueError("pacing.accept judges each cell on its control beat: set screen.control = true")
            if self.screen is not None:
                missing = [m for m in self.screen.metric_multiples if m not in self.screen.multiples]
                if missing:
                    raise ValueError(f"screen.metric_multiples {missing} are not in screen.multiples "
                                     f"{self.screen.multiples}")
        return self

    @model_validator(mode="after")
    def _trial_names(self):
        t = self.trial
        if t is None:
            return self
        arms = [a.name for a in self.arms]
        if t.reference_arm is not None and t.reference_arm not in arms:
            raise ValueError(f"trial.reference_arm = {t.reference_arm!r} is not an arm ({arms})")
        bms = [b.name for b in self.outputs.biomarkers]
        if t.primary is not None and t.primary not in bms:
            raise ValueError(f"trial.primary = {t.primary!r} is not a biomarker in outputs.biomarkers ({bms})")
        covs = set(self.cohort.covariates) | (set(self.cohort.csv.covariates) if self.cohort.csv else set())
        for where, names in (("strata", t.strata), ("subgroups", list(t.subgroups)),
                             ("inclusion", [c.covariate for c in t.inclusion]),
                             ("exclusion", [c.covariate for c in t.exclusion])):
            for i, n in enumerate(names):
                if n not in covs:
                    raise ValueError(f"trial.{where}[{i}] = {n!r} is not a covariate ({sorted(covs)})")
        for n in t.strata:
            cont = n in self.cohort.covariates and not isinstance(self.cohort.covariates[n], CategoricalDist)
            if cont and not isinstance(t.subgroups.get(n), list):
                raise ValueError(f"trial.strata: continuous covariate {n!r} needs band edges in trial.subgroups.{n}")
        return self

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, v):
        names = [a.name for a in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arm names must be unique; repeated: {dup}")
        return v


class LoadedJob:
    """A validated job plus its source text (kept verbatim for provenance) and location."""

    def __init__(self, job: Job, text: str, path: Path):
        self.job = job
        self.text = text
        self.path = path
        self.sha256 = hashlib.sha256(text.encode()).hexdigest()
        # what resume compares: the validated job without its [slurm] resources, so a comment,
        # key order or a new sbatch time limit does not stop a run from resuming (provenance
        # still records the exact text and its sha256)
        science = job.model_dump(mode="json", exclude={"slurm"})
        self.fingerprint = hashlib.sha256(json.dumps(science, sort_keys=True).encode()).hexdigest()

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, p: str) -> Path:
        """Paths inside a job are relative to the job file."""
        q = Path(p).expanduser()
        return q if q.is_absolute() else (self.base_dir / q)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # pydantic puts discriminator tags and function names in loc; keep only keys
            if part in ("normal", "lognormal", "uniform", "categorical", "constant") or "[" in str(part):
                continue
            out += ("." if out else "") + str(part)
    return out or "<root>"


def format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        key = _loc(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            parts.append(f"missing key '{key}'")
        elif e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}' (not allowed here)")
        else:
            val = e.get("input")
            if isinstance(val, (dict, list)) and len(repr(val)) > 60:
                parts.append(f"key '{key}': {msg}")  # a whole table: the message names the entry
                continue
            sval = repr(val)
            if len(sval) > 60:
                sval = sval[:57] + "..."
            parts.append(f"key '{key}' = {sval}: {msg}")
    return f"{source}: " + "; ".join(parts)


def parse_job(text: str, source: str = "<job>", path: Path | None = None) -> LoadedJob:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"{source}: malformed TOML: {e}") from None
    from .docking.config import is_docking, parse_docking_job

    if is_docking(data):  # a docking screen (engine.docking): library × targets, no cohort
        return parse_docking_job(data, text, source, path or Path(source))
    if "tissue" in data:  # a monodomain tissue job (engine/tissue): its own schema, no cohort
        from .tissue.config import TissueJob

        try:
            return LoadedJob(TissueJob.model_validate(data), text, path or Path(source))
        except ValidationError as e:
            raise JobError(format_validation_error(e, source)) from None
    try:
        job = Job.model_validate(data)
    except ValidationError as e:
        raise JobError(format_validation_error(e, source)) from None
    loaded = LoadedJob(job, text, path or Path(source))
    # model-aware checks (parameter names, output names) live next to the model registry
    from .models import check_job_against_model

    check_job_against_model(loaded)
    return loaded


def load_job(path: str | Path) -> LoadedJob:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise JobError(f"{p}: job file not found") from None
    except IsADirectoryError:
        raise JobError(f"{p}: is a directory, expected a .toml job file") from None
    except PermissionError:
        raise JobError(f"{p}: job file not readable (permission denied)") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobError(f"{p}: job file is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_job(text, str(p), p.resolve())
