"""Shared pieces of the tissue tests: a passive 'cell' (dV/dt = -I_stim) that turns the monodomain
solver into the plain heat equation, a runner for it, and the small TP06 slab job of the MPI and
resume tests."""

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


# a TP06 job (copy the cell file beside it): a 6 x 3 x 1.5 mm slab with rotated fibres (cross
# terms cross the slab cuts), two stimuli (one paced twice) and an APD: exercises every array
# the halo carries
SLAB_JOB = """
[job]
name = "tissue_mpi"
backend = "cpu"

[tissue]
dx = 0.25
dt = 0.05
end_time = 40.0

[tissue.cell]
file = "ten_tusscher_model_2006_epi.cellml"

[tissue.geometry]
size_mm = [6.0, 3.0, 1.5]

[tissue.conductivity]
sigma_long = 0.133418
sigma_trans = 0.017606

[tissue.fibres]
direction = [1.0, 0.5, 0.2]

[[tissue.stimuli]]
lo_mm = [0.0, 0.0, 0.0]
hi_mm = [1.0, 1.0, 1.5]
current = 50.0

[[tissue.stimuli]]
centre_mm = [6.0, 3.0, 0.0]
radius_mm = 0.6
start = 20.0
duration = 2.0

[tissue.outputs]
trace_every = 0.5
points = { a = [0.0, 0.0, 0.0], b = [3.0, 1.5, 0.75], c = [6.0, 3.0, 1.5] }
electrodes = [{ name = "e1", position_mm = [10.0, 1.5, 0.75] }, { name = "e2", position_mm = [3.0, 6.0, 0.0] }]
"""
