"""Controllers act on a simulation while it runs: insulin dosing from a sensor, chemotherapy dose
adaptation from neutrophil counts, and the like.

A controller sees the whole chunk at once (structure of arrays) at fixed control times. Between
two control times the compiled kernel integrates every patient in one call (engine.segments), so
there is no Python in the step loop. At a control time the controller may

- set inputs (`u[i] = ...`) and add to states (`y[i] += dose`) for the coming segment,
- give extra events inside the coming segment (e.g. a meal eaten at 5 g/min, minute by minute),
- record per-patient signals (sensor readings, insulin delivered) and results (biomarkers).

Its randomness comes from engine.rng streams keyed by (seed, patient), so results do not depend
on chunking or ranks. A controller is chosen in the job by `[controller] name` and configured by
`[controller.settings]`, validated by the controller's own pydantic model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from kernels.ode.integrate_numpy import Events
from kernels.ode.model import Model


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)


@dataclass
class Signal:
    unit: str
    long_name: str = ""


@dataclass
class ChunkContext:
    model: Model
    P: np.ndarray  # [n_par, m] individual parameters
    covariates: dict[str, np.ndarray]
    index: np.ndarray  # global patient indices (random streams are keyed by these)
    arm: np.ndarray
    seed: int
    t_end: float
    extra: dict = field(default_factory=dict)

    def param(self, name: str) -> np.ndarray:
        return self.P[self.model.parameter_names.index(name)]


class Controller:
    """Base class. Subclasses set `name`, `Settings`, `signals`, `results` and `observe`."""

    name: ClassVar[str]
    Settings: ClassVar[type[Settings]] = Settings
    signals: ClassVar[dict[str, Signal]] = {}  # per-control-time series, sampled at output times
    results: ClassVar[dict[str, Signal]] = {}  # per-patient scalars written to biomarkers/
    observe: ClassVar[list[str]] = []  # model outputs/states the controller reads at control times
    models: ClassVar[tuple[str, ...]] = ()  # model names it works with (empty: any)

    @classmethod
    def check_job(cls, settings: Settings, loaded) -> None:
        """Checks that need the whole job (arms, cohort, output times); raise JobError naming the
        key. Called by `twin validate` and before any `twin run`."""

    def __init__(self, settings: Settings, period: float, ctx: ChunkContext):
        self.s = settings
        self.period = period
        self.ctx = ctx

    def control_times(self) -> np.ndarray:
        return np.arange(0.0, self.ctx.t_end, self.period)

    def act(self, t: float, y: np.ndarray, u: np.ndarray, obs: dict[str, np.ndarray], alive: np.ndarray) -> None:
        """At control time t: read observations (values at t), modify y and u in place."""

    def finish(self, t: float, y: np.ndarray, u: np.ndarray, obs: dict[str, np.ndarray], alive: np.ndarray) -> None:
        """After the last segment, with the state and observations at t_end (no action follows)."""

    def events(self, t0: float, t1: float) -> Events | None:
        """Extra events in [t0, t1)."""
        return None

    def signal_values(self) -> dict[str, np.ndarray]:
        """Signals recorded so far, each [m, n_control_times]."""
        return {}

    def result_values(self) -> dict[str, np.ndarray]:
        return {}


REGISTRY: dict[str, type[Controller]] = {}


def register(cls: type[Controller]) -> type[Controller]:
    REGISTRY[cls.name] = cls
    return cls


def get_controller(name: str) -> type[Controller]:
    _load_builtin()
    try:
        return REGISTRY[name]
    except KeyError:
        from ..errors import JobError

        raise JobError(f"key 'controller.name' = {name!r}: unknown controller; available: "
                       f"{', '.join(sorted(REGISTRY)) or 'none'}") from None


def _load_builtin() -> None:
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
