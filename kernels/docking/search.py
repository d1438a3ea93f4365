"""Vina docking: grid maps in C/OpenMP (vina_search.c) or CUDA, Monte Carlo + BFGS chains of a
batch of ligands on the `cpu` (OpenMP) or `cuda` backend (batch.py, one chain source for both),
final poses refined against explicit receptor atoms in C and rescored by the NumPy reference.

Conformations are (root origin position, orientation quaternion, torsion angles); a ligand's input
coordinates are the zero conformation. Search parameters default to Vina's own heuristics.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from kernels.compile import build_shared_library, default_threads

from . import vina_sf as sf
from .atom_types import N_XS, NO_XS
from .pdbqt import Ligand

_I = ctypes.POINTER(ctypes.c_int)
_D = ctypes.POINTER(ctypes.c_double)
_L = ctypes.POINTER(ctypes.c_long)
SOURCE = Path(__file__).with_name("vina_search.c")


@lru_cache(maxsize=None)
def _lib():
    from .batch import with_header

    lib = ctypes.CDLL(str(build_shared_library(with_header(SOURCE), "twin_vina_search")))
    lig = [_I, _D, _D, ctypes.c_double, _D, ctypes.c_int, _I, _I, _D, ctypes.c_int, _I, _D, _D, _D,
           ctypes.c_int, _I, _I, _D, _D, ctypes.c_int]
    lib.vina_maps.argtypes = [ctypes.c_int, _I, _I, _D, _D, ctypes.c_int, _D, _I, ctypes.c_int, _D, ctypes.c_int, _D,
                              ctypes.c_int]
    lib.vina_eval.argtypes = lig + [ctypes.c_int, _D, ctypes.c_double, _D, _D, _D]
    lib.vina_local.argtypes = lig + [ctypes.c_int, _D, ctypes.c_double, ctypes.c_int, _D, _D]
    lib.vina_dock_batch.argtypes = [ctypes.c_int, ctypes.c_int, _I, _D, _D, ctypes.c_double, _D, _L, _I,
                                    ctypes.POINTER(ctypes.c_uint64), _I, _I, _D, _I, _D, _D, _D, _I, _I, _D, _D,
                                    ctypes.c_int, ctypes.c_double, ctypes.c_int, _D, _D, _D, _I, _L, _D, ctypes.c_int]
    lib.vina_refine.argtypes = lig + [ctypes.c_int, _D, _I, _I, ctypes.c_int, _D, _D, _D, _I, _I, _I, ctypes.c_int, _D,
                                      ctypes.c_double, ctypes.c_int, _D, _D, ctypes.c_int]
    for f in (lib.vina_maps, lib.vina_eval, lib.vina_local, lib.vina_dock_batch, lib.vina_refine):
        f.restype = ctypes.c_int
    return lib


def _p(a, t):
    return a.ctypes.data_as(t)


@dataclass
class Maps:
    box: sf.Box
    begin: np.ndarray
    end: np.ndarray
    npts: np.ndarray
    types: np.ndarray  # XS type of each map
    data: np.ndarray  # (n_types, nx, ny, nz)

    def index(self, t: int) -> int:
        return int(np.nonzero(self.types == t)[0][0])


def compute_maps(rec: sf.ReceptorIndex, types, box: sf.Box, threads: int | None = None) -> Maps:
    """Vina grid maps (0.375 Å) for the given ligand XS types, computed by the C kernel."""
    begin, end, npts = box.grid()
    types = np.ascontiguousarray(sorted({int(t) for t in types}), dtype=np.int32)
    lo, hi = begin - sf.CUTOFF, end + sf.CUTOFF
    near = np.all((rec.xyz >= lo) & (rec.xyz <= hi), axis=1)  # atoms further away cannot reach the grid
    rxyz = np.ascontiguousarray(rec.xyz[near], dtype=np.float64)
    rxs = np.ascontiguousarray(rec.xs[near], dtype=np.int32)
    fast = np.ascontiguousarray(sf.tables()[0])
    out = np.zeros((len(types), *npts), dtype=np.float64)
    n = np.ascontiguousarray(npts, dtype=np.int32)
    b, e = np.ascontiguousarray(begin, float), np.ascontiguousarray(end, float)
    rc = _lib().vina_maps(len(types), _p(types, _I), _p(n, _I), _p(b, _D), _p(e, _D), len(rxyz), _p(rxyz, _D),
                          _p(rxs, _I), N_XS, _p(fast, _D), sf.N_TABLE, _p(out, _D), threads or default_threads())
    if rc != 0:
        raise MemoryError("vina_maps: out of memory")
    return Maps(box, begin, end, npts, types, out)


def compute_maps_cuda(rec: sf.ReceptorIndex, types, box: sf.Box) -> Maps:
    """The same maps on the GPU (vina_maps.cu through CuPy): one thread per grid point."""
    import cupy as cp

    begin, end, npts = box.grid()
    types = np.ascontiguousarray(sorted({int(t) for t in types}), dtype=np.int32)
    lo = begin - sf.CUTOFF
    nc = (np.ceil((end + sf.CUTOFF - lo) / sf.CUTOFF) + 1).astype(int)
    cell3 = np.floor((rec.xyz - lo) / sf.CUTOFF).astype(int)
    ok = np.all((cell3 >= 0) & (cell3 < nc), axis=1)
    cell = (cell3[:, 0] * nc[1] + cell3[:, 1]) * nc[2] + cell3[:, 2]
    idx = np.nonzero(ok)[0]
    order = idx[np.argsort(cell[idx], kind="stable")].astype(np.int32)
    start = np.zeros(int(np.prod(nc)) + 1, dtype=np.int32)
    np.add.at(start, cell[idx] + 1, 1)
    start = np.cumsum(start).astype(np.int32)
    mod = cp.RawModule(code=SOURCE.with_name("vina_maps.cu").read_text(), options=("--std=c++14",))
    fn = mod.get_function("vina_maps_cuda")
    n = int(np.prod(npts))
    out = cp.zeros((len(types), n), dtype=cp.float64)
    inv = 1.0 / ((npts - 1) / (end - begin))  # as the C kernel computes its spacing
    fn(((n + 127) // 128,), (128,), (np.int32(len(types)), cp.asarray(types), *map(np.int32, npts),
                                     *map(np.float64, begin), *map(np.float64, inv), *map(np.float64, lo),
                                     *map(np.int32, nc), cp.asarray(start), cp.asarray(order),
                                     cp.asarray(rec.xyz.astype(np.float64)), cp.asarray(rec.xs.astype(np.int32)),
                                     np.int32(N_XS), cp.asarray(sf.tables()[0]), np.int32(sf.N_TABLE), out))
    return Maps(box, begin, end, npts, types, cp.asnumpy(out).reshape(len(types), *npts))


class LigandModel:
    """The flattened torsion tree and intramolecular tables the C kernel works on."""

    def __init__(self, lig: Ligand, maps: Maps):
        self.lig = lig
        xyz = lig.xyz
        nb = len(lig.parent)
        root_first = int(np.nonzero(lig.body == 0)[0][0])
        origin = np.zeros((nb, 3))
        origin[0] = xyz[root_first]
        for b in range(1, nb):
            origin[b] = xyz[lig.axis[b, 1]]
        self.root_origin = np.ascontiguousarray(origin[0])
        rel = np.zeros((nb, 3))
        ax = np.zeros((nb, 3))
        for b in range(1, nb):
            rel[b] = origin[b] - origin[lig.parent[b]]
            v = xyz[lig.axis[b, 1]] - xyz[lig.axis[b, 0]]
            ax[b] = v / np.linalg.norm(v)
        self.origin_rel = np.ascontiguousarray(rel)
        self.axis_ref = np.ascontiguousarray(ax)
        self.local = np.ascontiguousarray(xyz - origin[lig.body])
        self.atom_body = np.ascontiguousarray(lig.body, dtype=np.int32)
        self.parent = np.ascontiguousarray(lig.parent, dtype=np.int32)
        self.atom_map = np.ascontiguousarray([maps.index(t) if t != NO_XS else -1 for t in lig.xs], dtype=np.int32)
        pairs = lig.pairs
        key = lig.xs[pairs[:, 0]] * N_XS + lig.xs[pairs[:, 1]] if len(pairs) else np.zeros(0, int)
        uniq, inv = np.unique(key, return_inverse=True)
        _, smooth, dor = sf.tables()
        self.smooth = np.ascontiguousarray(smooth[uniq // N_XS, uniq % N_XS]) if len(uniq) else np.zeros((1, sf.N_TABLE))
        self.dor = np.ascontiguousarray(dor[uniq // N_XS, uniq % N_XS]) if len(uniq) else np.zeros((1, sf.N_TABLE))
        self.pairs = np.ascontiguousarray(pairs, dtype=np.int32).reshape(-1, 2)
        self.pair_tab = np.ascontiguousarray(inv, dtype=np.int32).reshape(-1)
        self.maps = maps
        self.n_conf = 7 + nb - 1

    def args(self):
        m = self.maps
        data = np.ascontiguousarray(m.data)
        self._keep = (data, np.ascontiguousarray(m.npts, dtype=np.int32), np.ascontiguousarray(m.begin, float),
                      np.ascontiguousarray(m.end, float))
        data, npts, b, e = self._keep
        return [_p(npts, _I), _p(b, _D), _p(e, _D), sf.SLOPE, _p(data, _D), len(self.atom_map), _p(self.atom_map, _I),
                _p(self.atom_body, _I), _p(self.local, _D), len(self.parent), _p(self.parent, _I),
                _p(self.origin_rel, _D), _p(self.axis_ref, _D), _p(self.root_origin, _D), len(self.pairs),
                _p(self.pairs, _I), _p(self.pair_tab, _I), _p(self.smooth, _D), _p(self.dor, _D), sf.N_TABLE]

    def identity_conf(self) -> np.ndarray:
        c = np.zeros(self.n_conf)
        c[:3] = self.root_origin
        c[3] = 1.0
        return c

    def evaluate(self, confs: np.ndarray, v: float = sf.CURL_V):
        """(energy, gradient in (position, torque, torsions), coordinates) of each conformation."""
        confs = np.ascontiguousarray(np.atleast_2d(confs), dtype=float)
        n = len(confs)
        e = np.zeros(n)
        g = np.zeros((n, self.n_conf - 1))
        x = np.zeros((n, len(self.atom_map), 3))
        _lib().vina_eval(*self.args(), n, _p(confs, _D), v, _p(e, _D), _p(g, _D), _p(x, _D))
        return e, g, x

    def local_opt(self, confs: np.ndarray, max_steps: int | None = None, v: float = sf.CURL_V):
        confs = np.ascontiguousarray(np.atleast_2d(confs), dtype=float).copy()
        n = len(confs)
        e = np.zeros(n)
        x = np.zeros((n, len(self.atom_map), 3))
        steps = max_steps or (25 + len(self.atom_map)) // 3
        _lib().vina_local(*self.args(), n, _p(confs, _D), v, steps, _p(e, _D), _p(x, _D))
        return e, confs, x


class ReceptorCells:
    """Receptor heavy atoms near the box in 8 Å cells, for the explicit-atom refinement kernel."""

    def __init__(self, rec: sf.ReceptorIndex, box: sf.Box):
        begin, end, _ = box.grid()
        lo = begin - sf.CUTOFF
        nc = (np.ceil((end + sf.CUTOFF - lo) / sf.CUTOFF) + 1).astype(int)
        c3 = np.floor((rec.xyz - lo) / sf.CUTOFF).astype(int)
        ok = np.nonzero(np.all((c3 >= 0) & (c3 < nc), axis=1))[0]
        cell = (c3[ok, 0] * nc[1] + c3[ok, 1]) * nc[2] + c3[ok, 2]
        srt = np.argsort(cell, kind="stable")
        self.xyz = np.ascontiguousarray(rec.xyz[ok[srt]], dtype=float)
        self.xs = np.ascontiguousarray(rec.xs[ok[srt]], dtype=np.int32)
        start = np.zeros(int(np.prod(nc)) + 1, dtype=np.int64)
        np.add.at(start, cell + 1, 1)
        self.start = np.ascontiguousarray(np.cumsum(start), dtype=np.int32)
        self.order = np.arange(len(ok), dtype=np.int32)
        self.lo = np.ascontiguousarray(lo, dtype=float)
        self.nc = np.ascontiguousarray(nc, dtype=np.int32)


def refine(model: "LigandModel", cells: ReceptorCells, confs: np.ndarray, threads: int | None = None):
    """Vina's final local optimisation against explicit receptor atoms (v = 1000, slope 1e6)."""
    confs = np.ascontiguousarray(np.atleast_2d(confs), dtype=float).copy()
    n = len(confs)
    e = np.zeros(n)
    x = np.zeros((n, len(model.atom_map), 3))
    _, smooth, dor = sf.tables()
    xs = np.ascontiguousarray(model.lig.xs, dtype=np.int32)
    steps = (25 + len(model.atom_map)) // 3
    _lib().vina_refine(*model.args(), len(cells.xyz), _p(cells.xyz, _D), _p(cells.xs, _I), _p(xs, _I), N_XS,
                       _p(np.ascontiguousarray(smooth), _D), _p(np.ascontiguousarray(dor), _D), _p(cells.lo, _D),
                       _p(cells.nc, _I), _p(cells.start, _I), _p(cells.order, _I), n, _p(confs, _D), sf.CURL_V, steps,
                       _p(e, _D), _p(x, _D), threads or default_threads())
    return e, confs, x


@dataclass
class Pose:
    xyz: np.ndarray  # all ligand atoms (hydrogens included)
    score: sf.Score


def heavy_rmsd(a: np.ndarray, b: np.ndarray, heavy: np.ndarray) -> float:
    d = a[heavy] - b[heavy]
    return float(np.sqrt((d * d).sum(axis=1).mean()))


def vina_steps(lig: Ligand) -> tuple[int, int]:
    """Vina's per-chain Monte Carlo step count and BFGS step count for a ligand."""
    n = len(lig.xs)
    heuristic = n + 10 * (6 + lig.n_torsions)
    return int(70 * 3 * (50 + heuristic) / 2), int((25 + n) / 3)


def dock(rec: sf.ReceptorIndex, lig: Ligand, box: sf.Box, exhaustiveness: int = 8, seed: int = 0, n_poses: int = 9,
         min_rmsd: float = 1.0, energy_range: float = 3.0, steps_scale: float = 1.0, maps: Maps | None = None,
         threads: int | None = None, refine_explicit: bool = True, backend: str = "cpu") -> tuple[list[Pose], dict]:
    """Dock one ligand: `exhaustiveness` independent chains, poses clustered at `min_rmsd`,
    rescored with explicit receptor atoms. Returns (poses best first, statistics)."""
    return dock_batch(rec, [lig], box, exhaustiveness, [seed], n_poses, min_rmsd, energy_range, steps_scale, maps,
                      threads, refine_explicit, backend)[0]


def dock_batch(rec: sf.ReceptorIndex, ligs: list[Ligand], box: sf.Box, exhaustiveness: int, seeds, n_poses: int = 9,
               min_rmsd: float = 1.0, energy_range: float = 3.0, steps_scale: float = 1.0, maps: Maps | None = None,
               threads: int | None = None, refine_explicit: bool = True,
               backend: str = "cpu") -> list[tuple[list[Pose], dict]]:
    """Dock several ligands into one receptor box: all their chains run in one batched call on
    `backend` ('cpu' or 'cuda'), sharing the receptor maps; each ligand's chain results are then
    merged, refined and scored as one ligand. Ligand i's chains use seed `seeds[i]`."""
    from .batch import search_chains

    if maps is None:
        maps = compute_maps(rec, np.concatenate([lg.xs[lg.xs != NO_XS] for lg in ligs]), box, threads)
    models = [LigandModel(lg, maps) for lg in ligs]
    steps = []
    for lg in ligs:
        g, loc = vina_steps(lg)
        steps.append((max(1, int(g * steps_scale)), loc))
    threads = threads or default_threads()
    chains = search_chains(models, seeds, steps, exhaustiveness, min_rmsd, backend, threads)
    cells = ReceptorCells(rec, box) if refine_explicit else None
    out = []
    for lg, model, ch, (g, loc) in zip(ligs, models, chains, steps):
        poses = finish_ligand(rec, lg, box, model, ch, n_poses, min_rmsd, energy_range, cells, threads)
        out.append((poses, {"global_steps": g, "local_steps": loc, "chains": exhaustiveness,
                            "bfgs_calls": int(ch.evals.sum())}))
    return out


def finish_ligand(rec: sf.ReceptorIndex, lig: Ligand, box: sf.Box, model: "LigandModel", ch, n_poses: int,
                  min_rmsd: float, energy_range: float, cells: "ReceptorCells | None", threads: int) -> list[Pose]:
    """One ligand's chain poses: merged best first, clustered at min_rmsd (Vina remove_redundant),
    refined against explicit receptor atoms (when `cells`), scored, cut to energy_range/n_poses."""
    cand = [(ch.E[k, i], ch.X[k, i], ch.C[k, i]) for k in range(len(ch.kept)) for i in range(ch.kept[k])]
    cand.sort(key=lambda t: t[0])
    heavy = lig.heavy
    chosen: list[np.ndarray] = []
    confs = []
    for _, x, c in cand:  # Vina remove_redundant: drop poses within min_rmsd of a better one
        if all(heavy_rmsd(x, y, heavy) >= min_rmsd for y in chosen):
            chosen.append(x)
            confs.append(c)
    if cells is not None and confs:  # as Vina: refine against explicit receptor atoms before scoring
        _, _, xr = refine(model, cells, np.array(confs), threads)
        chosen = list(xr)
    inter = [sf.inter_energy(rec, x, lig.xs, box) for x in chosen]
    intra = [sf.intra_energy(x, lig.xs, lig.pairs) for x in chosen]
    order = np.argsort(np.array(inter) + np.array(intra), kind="stable")
    unbound = intra[order[0]] if len(order) else 0.0
    poses = []
    for i in order:
        s = score_with_terms(rec, chosen[i], lig, box, unbound)
        poses.append(Pose(chosen[i], s))
    best = poses[0].score.total if poses else np.nan
    return [p for p in poses if p.score.total <= best + energy_range][:n_poses]


def score_with_terms(rec: sf.ReceptorIndex, xyz: np.ndarray, lig: Ligand, box: sf.Box | None,
                     unbound: float | None = None) -> sf.Score:
    """Vina's score plus per-term energies as Vina reports them with one term weighted at a time."""
    s = sf.score_pose(rec, xyz, lig.xs, lig.pairs, lig.num_tors, box, unbound)
    terms = np.zeros(len(sf.TERMS))
    for k in range(len(sf.TERMS)):
        w = np.zeros(len(sf.TERMS))
        w[k] = sf.WEIGHTS[k]
        terms[k] = sf.inter_energy(rec, xyz, lig.xs, box, tuple(w))
    s.terms = terms
    return s
