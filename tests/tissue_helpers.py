"""Shared pieces of the tissue tests: a passive 'cell' (dV/dt = -I_stim) that turns the monodomain
solver into the plain heat equation, and a runner for it."""

from __future__ import annotations

import numpy as np

from engine.tissue.geometry import Geometry
from engine.tissue.solver import TissueSolver
from kernels.ode.model import Input, Model, State
from kernels.tissue.build import tissue_kernels

PASSIVE = Model(name="passive_membrane", description="dV/dt = -i_stim_amp: diffusion only", time_unit="ms",
                states=[State("V", 0.0, "mV")], parameters=[], derivatives={"V": "-i_stim_amp"}, outputs=[],
                inputs=[Input("i_stim_amp")])


def heat(geom: Geometry, v0: np.ndarray, dt: float, steps: int, backend: str = "cpu", substeps: int = 1,
         comm=None) -> np.ndarray:
    """Run `steps` steps of pure diffusion from v0 [NX, NY, NZ]; the global V on rank 0."""
    s = TissueSolver(geom, PASSIVE, np.zeros(0), tissue_kernels(PASSIVE, backend), [], dt, substeps, comm)
    full = np.zeros(s.shape)
    lo = s.x0 - 1
    g0, g1 = max(lo, 0), min(s.x1 + 1, geom.shape[0])
    full[g0 - lo:g1 - lo, 1:-1, 1:-1] = v0[g0:g1]
    s.Y[s.vidx][:] = full.reshape(-1)
    s.Vprev[:] = full.reshape(-1)
    for _ in range(steps):
        s.step()
    return s.gather(s.Y[s.vidx])
