"""Backend bundles: one kernel object per (model, integrator, backend), built once and cached.

Only `engine.backend` decides which backend runs; this module builds what it is told to.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from .ode.codegen_numpy import generate
from .ode.integrate_numpy import Events, SolverOptions, integrate
from .ode.model import Model


@dataclass
class OdeKernel:
    """Runs the whole time loop of a chunk of patients in one call."""

    model: Model
    backend: str
    run: Callable  # run(p, events, times, opts, record, status, check) -> (samples, status)
    source: str


@lru_cache(maxsize=None)
def _numpy_kernel(model_name: str, model_id: int) -> OdeKernel:
    from engine.models import get_model

    model = get_model(model_name)
    gen = generate(model)
    st = model.state_names

    def run(p: np.ndarray, events: Events, times: np.ndarray, opts: SolverOptions, record: list[str],
            status: np.ndarray, check=None):
        outs = model.output_names
        picks = [("o", outs.index(r)) if r in outs else ("s", st.index(r)) for r in record]

        def rec(t, y, pp, u):
            o = gen.outputs(t, y, pp, u) if any(k == "o" for k, _ in picks) else None
            return np.array([o[i] if k == "o" else y[i] for k, i in picks])

        y0 = gen.init(p)
        return integrate(gen.rhs, rec, y0, p, len(model.inputs), events, times, opts, status=status, check=check)

    return OdeKernel(model, "numpy", run, gen.source)


def ode_kernel(model: Model, backend: str) -> OdeKernel:
    if backend == "numpy":
        return _numpy_kernel(model.name, id(model))
    raise ValueError(f"no {backend!r} kernel builder for ODE models")
