"""Monodomain time stepping on one rank's slab, with halo exchange between ranks.

    Cm dV/dt = -I_ion(V, y) - I_stim + (1/chi) div(sigma grad V)   <=>   dV/dt = -I_ion/Cm ... + div(D grad V)

The cell model's currents are per unit capacitance (A/F = mV/ms), so the stimulus is given in the
same unit (uA/mm^3 divided by chi*Cm). Godunov splitting per step dt: the cell step (Rush-Larsen
for gating states, forward Euler otherwise), then `substeps` explicit diffusion steps of dt/substeps.

Decomposition: the grid's x axis is cut into contiguous slabs, one per rank (`slab_bounds`). Each
rank holds its slab padded by one ghost plane on every side. Before every diffusion step the
potential's boundary planes go to the neighbouring ranks (mpi4py Sendrecv; device arrays go straight
to a CUDA-aware MPI library, else they are staged through host memory: engine/parallel.cuda_aware_mpi).
Every voxel's arithmetic is the same whatever the rank count, so maps and
traces equal the one-rank run exactly; only the pseudo-ECG sum is reduced in a different order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.parallel import SerialComm

from .geometry import Geometry


@dataclass
class Stimulus:
    region: np.ndarray  # global bool mask [NX, NY, NZ]
    start: float  # ms
    duration: float  # ms
    amplitude: float  # stimulus current in the cell model's unit (A/F), sign as the model adds it
    period: float = 0.0  # ms; 0: a single pulse
    count: int = 1

    def active(self, t: float, dt: float) -> bool:
        eps = 1e-9 * dt
        for k in range(self.count):
            t0 = self.start + k * self.period
            if t0 - eps <= t < t0 + self.duration - eps:
                return True
        return False


def slab_bounds(nx: int, size: int, rank: int) -> tuple[int, int]:
    """[x0, x1) of `rank`'s slab: contiguous, sizes differing by at most one plane."""
    base, extra = divmod(nx, size)
    x0 = rank * base + min(rank, extra)
    return x0, x0 + base + (1 if rank < extra else 0)


@dataclass
class Maps:
    """Per-voxel results on one rank's owned slab [nxl, NY, NZ] (NaN where never reached)."""

    activation: np.ndarray  # first up-crossing of the activation threshold, ms
    last_activation: np.ndarray
    repolarisation: np.ndarray
    apd: np.ndarray  # last complete action potential: down-crossing of the repolarisation threshold - activation
    n_activations: np.ndarray


@dataclass
class TissueResult:
    t_end: float
    steps: int
    maps: Maps | None  # global maps on rank 0, None elsewhere
    trace_times: np.ndarray
    traces: np.ndarray | None  # [n_points, T] on rank 0
    ecg: np.ndarray | None  # [n_electrodes, T] on rank 0 (uV)
    wall_s: float = 0.0
    stats: dict = field(default_factory=dict)


class TissueSolver:
    def __init__(self, geom: Geometry, model, params: np.ndarray, kernels, stimuli: list[Stimulus], dt: float,
                 substeps: int = 1, comm=None, thr_act: float = 0.0, thr_rep: float = -70.0, xp=np,
                 vname: str = "V"):
        self.comm = comm or SerialComm()
        self.geom, self.model, self.k, self.xp = geom, model, kernels, xp
        self.dt, self.substeps = float(dt), int(substeps)
        self.thr_act, self.thr_rep = float(thr_act), float(thr_rep)
        NX, NY, NZ = geom.shape
        r, s = self.comm.rank, self.comm.size
        if s > NX:
            raise ValueError(f"{s} ranks for a grid of {NX} x-planes: use at most {NX} ranks")
        self.x0, self.x1 = slab_bounds(NX, s, r)
        nxl = self.x1 - self.x0
        self.shape = (nxl + 2, NY + 2, NZ + 2)
        self.n = int(np.prod(self.shape))
        self.plane = (NY + 2) * (NZ + 2)
        if xp is not np and s > 1:
            from engine.parallel import cuda_aware_mpi

            self.cuda_aware = cuda_aware_mpi()
        else:
            self.cuda_aware = False
        self.own = (slice(1, nxl + 1), slice(1, NY + 1), slice(1, NZ + 1))
        # x-range of the global grid this padded slab covers, ghost planes included
        lo, hi = self.x0 - 1, self.x1 + 1

        def pad(a, fill=0):
            out = np.full(self.shape, fill, dtype=a.dtype)
            g0, g1 = max(lo, 0), min(hi, NX)
            out[g0 - lo:g1 - lo, 1:-1, 1:-1] = a[g0:g1]
            return out

        mask = pad(geom.mask.astype(np.uint8))
        self.mask_h = mask
        self.mask = xp.asarray(mask.reshape(-1))
        self.D6 = [xp.asarray(pad(d.astype(float)).reshape(-1)) for d in geom.tensor()]
        self.cross = geom.has_cross()
        self.h3 = (geom.dx,) * 3
        # the kernels take one stimulus id per voxel: voxels in several overlapping regions get the id
        # of their combination, whose current is the sum of the members' active currents
        n_st = len(stimuli)
        member = np.zeros((n_st, int(np.prod(geom.shape))), bool)
        for i, st in enumerate(stimuli):
            member[i] = st.region.reshape(-1)
        if n_st <= 62:  # a voxel's set of stimuli as the bits of one integer
            key = np.zeros(member.shape[1], np.int64)
            for i in range(n_st):
                key |= member[i].astype(np.int64) << i
            keys, inv = np.unique(key, return_inverse=True)
            combos = ((keys[:, None] >> np.arange(n_st)) & 1).astype(bool)
        else:
            combos, inv = np.unique(member.T, axis=0, return_inverse=True)
        inv = np.asarray(inv).reshape(-1)
        keep = [c for c in range(len(combos)) if combos[c].any()]
        if len(keep) > 127:
            raise ValueError(f"{len(keep)} distinct combinations of overlapping stimulus regions; at most 127")
        remap = np.full(len(combos), -1, np.int8)
        remap[keep] = np.arange(len(keep))
        cid = remap[inv].reshape(geom.shape)
        self.combos = combos[keep].reshape(len(keep), n_st)
        self.stim_id = xp.asarray(pad(cid, -1).reshape(-1))
        self.stimuli = stimuli
        self.p = xp.asarray(np.ascontiguousarray(params, float))
        names = model.state_names
        self.vidx = voltage_index(model, vname)
        y0 = _initial_state(model, params)
        Y = np.repeat(y0[:, None], self.n, axis=1)
        self.Y = xp.asarray(Y)
        self.Vs = xp.asarray(Y[self.vidx].copy())
        self.V2 = xp.asarray(Y[self.vidx].copy())
        self.Vprev = xp.asarray(Y[self.vidx].copy())
        nan = np.full(self.n, np.nan)
        self.act1, self.act2, self.rep, self.apd = (xp.asarray(nan.copy()) for _ in range(4))
        self.nact = xp.zeros(self.n, dtype=np.int32)
        self.t = 0.0
        self.steps = 0

    # ---------------------------------------------------------------- halo exchange
    def halo(self, V) -> None:
        c = self.comm
        if c.size == 1:
            return
        from mpi4py import MPI

        P, nxl = self.plane, self.shape[0] - 2
        left = c.rank - 1 if c.rank > 0 else MPI.PROC_NULL
        right = c.rank + 1 if c.rank < c.size - 1 else MPI.PROC_NULL
        xp = self.xp
        if xp is not np and self.cuda_aware:  # device buffers straight to a CUDA-aware MPI
            xp.cuda.get_current_stream().synchronize()  # the planes must be written before MPI reads them
            recv_r, recv_l = xp.empty(P), xp.empty(P)
            c.Sendrecv(V[P:2 * P], dest=left, sendtag=1, recvbuf=recv_r, source=right, recvtag=1)
            c.Sendrecv(V[nxl * P:(nxl + 1) * P], dest=right, sendtag=2, recvbuf=recv_l, source=left, recvtag=2)
            if c.rank < c.size - 1:
                V[(nxl + 1) * P:(nxl + 2) * P] = recv_r
            if c.rank > 0:
                V[0:P] = recv_l
            return
        host = V if xp is np else None
        if host is None:  # device memory staged through the host (MPI not CUDA-aware)
            send_l, send_r = xp.asnumpy(V[P:2 * P]), xp.asnumpy(V[nxl * P:(nxl + 1) * P])
        else:
            send_l, send_r = np.ascontiguousarray(V[P:2 * P]), np.ascontiguousarray(V[nxl * P:(nxl + 1) * P])
        recv_r, recv_l = np.empty(P), np.empty(P)
        c.Sendrecv(send_l, dest=left, sendtag=1, recvbuf=recv_r, source=right, recvtag=1)
        c.Sendrecv(send_r, dest=right, sendtag=2, recvbuf=recv_l, source=left, recvtag=2)
        if c.rank < c.size - 1:
            V[(nxl + 1) * P:(nxl + 2) * P] = recv_r if host is not None else xp.asarray(recv_r)
        if c.rank > 0:
            V[0:P] = recv_l if host is not None else xp.asarray(recv_l)

    # ---------------------------------------------------------------- one step
    def step(self) -> None:
        xp, k = self.xp, self.k
        a = np.array([st.amplitude if st.active(self.t, self.dt) else 0.0 for st in self.stimuli])
        amp = np.array([float(np.sum(a[c])) for c in self.combos] or [0.0])  # in member order, as before
        V = self.Y[self.vidx]
        k.cell(self.mask, self.Y, self.Vs, self.p, self.stim_id, xp.asarray(amp), self.t, self.dt, self.vidx)
        h = self.dt / self.substeps
        src, spare = self.Vs, self.V2
        for s in range(self.substeps):
            dst = V if s == self.substeps - 1 else spare
            self.halo(src)
            k.diffuse(self.shape, self.mask, src, dst, self.D6, self.h3, h, self.cross)
            if s < self.substeps - 1:
                src, spare = dst, src
        self.last_src, self.last_h = src, h
        k.track(self.mask, V, self.Vprev, self.act1, self.act2, self.rep, self.apd, self.nact, self.t, self.dt,
                self.thr_act, self.thr_rep)
        self.steps += 1
        self.t = self.steps * self.dt

    # ---------------------------------------------------------------- views of owned voxels
    def owned(self, a) -> np.ndarray:
        h = a if self.xp is np else self.xp.asnumpy(a)
        return np.asarray(h).reshape(self.shape)[self.own]

    def gather(self, a) -> np.ndarray | None:
        """Global [NX, NY, NZ] array on rank 0 from each rank's owned slab (x order = rank order)."""
        parts = self.comm.gather(np.ascontiguousarray(self.owned(a)), root=0)
        return np.concatenate(parts, axis=0) if self.comm.rank == 0 else None

    def local_index(self, node) -> int | None:
        """Padded-slab flat index of global node (i, j, k) if this rank owns it."""
        i, j, k = node
        if not self.x0 <= i < self.x1:
            return None
        return int(np.ravel_multi_index((i - self.x0 + 1, j + 1, k + 1), self.shape))

    def maps(self) -> Maps | None:
        g = [self.gather(a) for a in (self.act1, self.act2, self.rep, self.apd, self.nact)]
        return Maps(*g) if self.comm.rank == 0 else None


def voltage_index(model, vname: str = "V") -> int:
    """Index of the membrane-potential state: a state named `vname`, or the state the model's
    output `vname` is (the CellML importer maps the membrane voltage to output V)."""
    if vname in model.state_names:
        return model.state_names.index(vname)
    for o in model.outputs:
        if o.name == vname and o.expr.strip() in model.state_names:
            return model.state_names.index(o.expr.strip())
    raise ValueError(f"model {model.name} has no membrane-potential state {vname!r}")


def _initial_state(model, params: np.ndarray) -> np.ndarray:
    from kernels.ode.codegen_numpy import generate

    return np.asarray(generate(model).init(np.asarray(params, float)[:, None]))[:, 0]
