"""`twin calibrate` job files: [job], [model], [solver] as for `twin run`, plus [observations]
(engine.observations) and [calibration] (what is estimated, the prior, the error model).

    [calibration]
    parameters = ["ka", "CL", "V1"]          # estimated, log scale
    prior = { ka = 1.5, CL = 2.8, V1 = 32.0 } # typical values (prior median)
    omega = [[0.5, 0, 0], [0, 0.1, 0], [0, 0, 0.05]]   # prior covariance of the log parameters
    population = true                        # first estimate prior/omega/error from all patients
    [calibration.error.C]
    additive = 0.7
    proportional = 0.0
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, ValidationError, model_validator

from ..config import JobSection, ModelSection, Name, NonNeg, Pos, SolverSection, Strict, format_validation_error
from ..errors import JobError
from ..observations import ObservationsSection


class ErrorModel(Strict):
    additive: NonNeg = 0.0
    proportional: NonNeg = 0.0
    correlation_time: NonNeg = 0.0  # residual autocorrelation exp(-dt/tau) (CGM noise), model time unit

    @model_validator(mode="after")
    def _some(self):
        if self.additive == 0 and self.proportional == 0:
            raise ValueError("give 'additive' and/or 'proportional' > 0")
        return self


class CalibrationSection(Strict):
    parameters: Annotated[list[str], Field(min_length=1, max_length=32)]
    prior: dict[str, Pos]
    omega: list[list[float]]
    error: Annotated[dict[str, ErrorModel], Field(min_length=1)]
    population: bool = False
    population_error: Literal["additive", "proportional"] = "additive"
    population_max_iter: Annotated[int, Field(ge=1, le=10_000)] = 200
    max_iter: Annotated[int, Field(ge=1, le=10_000)] = 100
    infusion_duration: Pos | None = None  # dose route is an infusion: its duration

    @model_validator(mode="after")
    def _shape(self):
        k = len(self.parameters)
        dup = sorted({p for p in self.parameters if self.parameters.count(p) > 1})
        if dup:
            raise ValueError(f"parameters repeats {dup}")
        missing = [p for p in self.parameters if p not in self.prior]
        if missing:
            raise ValueError(f"prior has no typical value for {missing}")
        extra = [p for p in self.prior if p not in self.parameters]
        if extra:
            raise ValueError(f"prior names {extra}, which are not estimated parameters {self.parameters}")
        om = np.asarray(self.omega, float)
        if om.shape != (k, k):
            raise ValueError(f"omega must be {k}x{k} (one row per estimated parameter), got shape {om.shape}")
        if not np.allclose(om, om.T) or not np.isfinite(om).all():
            raise ValueError("omega must be a symmetric matrix of finite numbers")
        try:
            np.linalg.cholesky(om)
        except np.linalg.LinAlgError:
            raise ValueError("omega must be positive definite") from None
        if self.population and self.population_error == "additive" and any(e.proportional for e in self.error.values()):
            raise ValueError("population_error = 'additive' estimates additive errors only; set proportional = 0")
        if self.population and self.population_error == "proportional" and any(e.additive for e in self.error.values()):
            raise ValueError("population_error = 'proportional' estimates proportional errors only; set additive = 0")
        return self

    def mu(self) -> np.ndarray:
        return np.log([self.prior[p] for p in self.parameters])


class AlertSpec(Strict):
    name: Name
    output: str
    below: float | None = None
    above: float | None = None
    rise: Pos | None = None  # trend rules: change from the current value within `within`
    fall: Pos | None = None
    within: Pos = 30.0  # model time units after the forecast origin
    probability: Annotated[float, Field(gt=0, le=1)] = 0.5
    refractory: NonNeg = 30.0

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("below", "above", "rise", "fall") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'below', 'above', 'rise', 'fall' (got {given or 'none'})")
        return self

    def rule(self) -> tuple[str, float]:
        k = next(k for k in ("below", "above", "rise", "fall") if getattr(self, k) is not None)
        return k, float(getattr(self, k))


class AssimilationSection(Strict):
    """Stream each twin's observations through an ensemble Kalman filter (engine.assimilate)."""

    output: str  # the observed output assimilated
    parameters: list[str]  # estimated by the filter (a subset of calibration.parameters)
    members: Annotated[int, Field(ge=4, le=4096)] = 32
    obs_sd: Pos
    inflation: Annotated[float, Field(ge=1.0, le=2.0)] = 1.02
    horizon: Pos = 60.0
    lead_step: Pos = 5.0
    leads: Annotated[list[Pos], Field(min_length=1)] = Field(default_factory=lambda: [30.0, 60.0])
    alerts: list[AlertSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _leads(self):
        for x in self.leads:
            if x > self.horizon or abs(x / self.lead_step - round(x / self.lead_step)) > 1e-9:
                raise ValueError(f"leads: {x} must be a multiple of lead_step={self.lead_step} within horizon={self.horizon}")
        for a in self.alerts:
            if a.output != self.output:
                raise ValueError(f"alerts {a.name!r}: output {a.output!r} is not the assimilated output {self.output!r}")
            if a.within > self.horizon:
                raise ValueError(f"alerts {a.name!r}: within={a.within} is beyond horizon={self.horizon}")
        return self


class CalibrationJob(Strict):
    job: JobSection
    model: ModelSection
    solver: SolverSection = SolverSection()
    observations: ObservationsSection
    calibration: CalibrationSection
    assimilation: AssimilationSection | None = None

    @model_validator(mode="after")
    def _names(self):
        a = self.assimilation
        if a is not None:
            if a.output not in self.observations.variables:
                raise ValueError(f"assimilation.output = {a.output!r} is not an observed variable "
                                 f"({sorted(self.observations.variables)})")
            bad = [p for p in a.parameters if p not in self.calibration.parameters]
            if bad:
                raise ValueError(f"assimilation.parameters = {bad}: not in calibration.parameters "
                                 f"(the filter's prior comes from there)")
        for o in self.calibration.error:
            if o not in self.observations.variables:
                raise ValueError(f"calibration.error.{o}: {o!r} is not an observed variable "
                                 f"({sorted(self.observations.variables)})")
        for o in self.observations.variables:
            if o not in self.calibration.error:
                raise ValueError(f"calibration.error has no entry for observed variable {o!r}")
        return self


class LoadedCalibration:
    def __init__(self, job: CalibrationJob, text: str, path: Path):
        self.job, self.text, self.path = job, text, path
        self.sha256 = hashlib.sha256(text.encode()).hexdigest()

    def resolve(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else (self.path.parent / q)


def load_calibration(path: str | Path) -> LoadedCalibration:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"{p}: job file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"{p}: cannot read job file ({e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"{p}: malformed TOML: {e}") from None
    try:
        job = CalibrationJob.model_validate(data)
    except ValidationError as e:
        raise JobError(format_validation_error(e, str(p))) from None
    loaded = LoadedCalibration(job, text, p.resolve())
    if job.solver.precision != "float64":
        raise JobError(f"{p}: key 'solver.precision' = {job.solver.precision!r}: calibration and assimilation run in "
                       "float64 (Gauss-Newton steps need sensitivities accurate beyond float32's ~1e-5)")
    from ..models import job_model

    model = job_model(loaded)
    c = job.calibration
    for where, names in (("calibration.parameters", c.parameters), ("model.parameters", list(job.model.parameters))):
        bad = [n for n in names if n not in model.parameter_names]
        if bad:
            raise JobError(f"{p}: key '{where}' = {bad}: not parameters of {model.name} ({model.parameter_names})")
    bad = [o for o in job.observations.variables if o not in model.observable()]
    if bad:
        raise JobError(f"{p}: key 'observations.variables' = {bad}: not outputs or states of {model.name} "
                       f"({model.observable()})")
    bad = [i for i in job.observations.inputs if i not in model.input_names]
    if bad:
        raise JobError(f"{p}: key 'observations.inputs' = {bad}: not inputs of {model.name} ({model.input_names})")
    d = job.observations.doses
    if d is not None and d.route not in model.doses:
        raise JobError(f"{p}: key 'observations.doses.route' = {d.route!r}: {model.name} has routes {sorted(model.doses)}")
    return loaded
