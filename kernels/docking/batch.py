"""Batched docking search: many ligands × `exhaustiveness` Monte Carlo chains in one call.

The chain code is vina_chain.h, compiled into the `cpu` library (vina_search.c, one chain per
OpenMP iteration) and into vina_dock_batch.cu for the `cuda` backend (one GPU thread per chain).
Ligands are packed CSR-style: their atoms, torsion-tree bodies, intramolecular pairs and pair
tables are concatenated, with per-ligand offsets; every ligand reads the same receptor maps. Chain k
of a ligand draws from the stream (ligand seed, k): results do not depend on which other ligands
share the batch, their order, or the number of threads.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
HEADER = "vina_chain.h"
CUDA_SOURCE = HERE / "vina_dock_batch.cu"
KEEP = 20  # poses kept per chain (as the per-ligand path always did)
_I = ctypes.POINTER(ctypes.c_int)
_D = ctypes.POINTER(ctypes.c_double)
_L = ctypes.POINTER(ctypes.c_long)
_U = ctypes.POINTER(ctypes.c_uint64)


def with_header(path: Path) -> str:
    """The source with vina_chain.h pasted in: one self-contained text for the C compiler
    cache (keyed by source hash) and for NVRTC, which has no include path to the package."""
    text = path.read_text()
    inc = f'#include "{HEADER}"'
    if inc not in text:
        raise RuntimeError(f"{path.name}: missing {inc}")
    return text.replace(inc, (HERE / HEADER).read_text())


def pool_doubles(n_atoms: int, n_bodies: int) -> int:
    """Work doubles per chain (chain_pool_doubles in vina_chain.h)."""
    n, nc = 5 + n_bodies, 6 + n_bodies
    return 6 * n_atoms + 18 * n_bodies + (n * n + 6 * n + 3 * nc + 8) + 2 * nc + 3 * n_atoms


@dataclass
class ChainResults:
    """One ligand's chains: energies E [chain, keep] (inf: empty slot), conformations C, coordinates X."""

    E: np.ndarray
    C: np.ndarray
    X: np.ndarray
    kept: np.ndarray
    evals: np.ndarray


class Batch:
    """A packed batch of ligand models (all built on the same Maps) × `exh` chains."""

    def __init__(self, models, seeds, steps, exh: int, min_rmsd: float, keep: int = KEEP):
        if not models:
            raise ValueError("empty docking batch")
        maps = models[0].maps
        if any(m.maps is not maps for m in models):
            raise ValueError("every ligand of a docking batch must use the same receptor maps")
        self.models, self.maps, self.exh, self.keep, self.min_rmsd = list(models), maps, int(exh), int(keep), min_rmsd
        na = np.array([len(m.atom_map) for m in models])
        nb = np.array([len(m.parent) for m in models])
        npair = np.array([len(m.pairs) for m in models])
        ntabrow = np.array([len(m.smooth) for m in models])
        per = np.stack([na, nb, npair, ntabrow, exh * keep * (6 + nb), exh * keep * 3 * na,
                        exh * np.array([pool_doubles(a, b) for a, b in zip(na, nb)]), np.zeros_like(na)], axis=1)
        self.off = np.zeros((len(models) + 1, 8), dtype=np.int64)
        self.off[1:] = np.cumsum(per, axis=0)
        self.steps = np.ascontiguousarray(np.array(steps, dtype=np.int32).reshape(len(models), 2))
        self.seeds = np.ascontiguousarray(np.array([int(s) % 2**64 for s in seeds], dtype=np.uint64))
        cat = np.concatenate
        self.atom_map = np.ascontiguousarray(cat([m.atom_map for m in models]), dtype=np.int32)
        self.atom_body = np.ascontiguousarray(cat([m.atom_body for m in models]), dtype=np.int32)
        self.local = np.ascontiguousarray(cat([m.local for m in models]), dtype=np.float64)
        self.parent = np.ascontiguousarray(cat([m.parent for m in models]), dtype=np.int32)
        self.origin_rel = np.ascontiguousarray(cat([m.origin_rel for m in models]), dtype=np.float64)
        self.axis_ref = np.ascontiguousarray(cat([m.axis_ref for m in models]), dtype=np.float64)
        self.root_origin = np.ascontiguousarray(np.stack([m.root_origin for m in models]), dtype=np.float64)
        self.pairs = np.ascontiguousarray(cat([m.pairs for m in models]).reshape(-1, 2), dtype=np.int32)
        self.pair_tab = np.ascontiguousarray(cat([m.pair_tab for m in models]), dtype=np.int32)
        self.smooth = np.ascontiguousarray(cat([m.smooth for m in models]), dtype=np.float64)
        self.dor = np.ascontiguousarray(cat([m.dor for m in models]), dtype=np.float64)
        # at least one element each, so no pointer is NULL for a batch without pairs
        for k in ("pairs", "pair_tab"):
            if getattr(self, k).size == 0:
                setattr(self, k, np.zeros(2, dtype=np.int32))
        self.n_chains = len(models) * self.exh
        tot = self.off[-1]
        self.E = np.full(self.n_chains * keep, np.inf)
        self.C = np.zeros(max(int(tot[4]), 1))
        self.X = np.zeros(max(int(tot[5]), 1))
        self.kept = np.zeros(self.n_chains, dtype=np.int32)
        self.evals = np.zeros(self.n_chains, dtype=np.int64)
        self.pool_size = max(int(tot[6]), 1)

    def results(self) -> list[ChainResults]:
        out, e = [], self.exh
        for i, m in enumerate(self.models):
            o, na, nc = self.off[i], len(m.atom_map), 6 + len(m.parent)
            sl = slice(i * e, (i + 1) * e)
            out.append(ChainResults(self.E[i * e * self.keep:(i + 1) * e * self.keep].reshape(e, self.keep),
                                    self.C[o[4]:o[4] + e * self.keep * nc].reshape(e, self.keep, nc),
                                    self.X[o[5]:o[5] + e * self.keep * 3 * na].reshape(e, self.keep, na, 3),
                                    self.kept[sl], self.evals[sl]))
        return out

    def _grid(self):
        m = self.maps
        return (np.ascontiguousarray(m.npts, dtype=np.int32), np.ascontiguousarray(m.begin, dtype=np.float64),
                np.ascontiguousarray(m.end, dtype=np.float64))

    def run_cpu(self, threads: int) -> list[ChainResults]:
        from .search import _lib, _p
        from .vina_sf import N_TABLE, SLOPE

        npts, begin, end = self._grid()
        data = np.ascontiguousarray(self.maps.data, dtype=np.float64)
        pool = np.empty(self.pool_size)
        rc = _lib().vina_dock_batch(
            len(self.models), self.exh, _p(npts, _I), _p(begin, _D), _p(end, _D), SLOPE, _p(data, _D),
            self.off.ctypes.data_as(_L), _p(self.steps, _I), self.seeds.ctypes.data_as(_U), _p(self.atom_map, _I),
            _p(self.atom_body, _I), _p(self.local, _D), _p(self.parent, _I), _p(self.origin_rel, _D),
            _p(self.axis_ref, _D), _p(self.root_origin, _D), _p(self.pairs, _I), _p(self.pair_tab, _I),
            _p(self.smooth, _D), _p(self.dor, _D), N_TABLE, self.min_rmsd, self.keep, _p(self.E, _D),
            _p(self.C, _D), _p(self.X, _D), _p(self.kept, _I), self.evals.ctypes.data_as(_L), _p(pool, _D), threads)
        if rc != 0:
            raise RuntimeError(f"vina_dock_batch returned {rc}")
        return self.results()

    def run_cuda(self, block: int = 64) -> list[ChainResults]:  # pragma: no cover - needs a GPU
        import cupy as cp

        from .vina_sf import N_TABLE, SLOPE

        d = cp.asarray
        maps = getattr(self.maps, "_device", None)
        if maps is None:  # uploaded once per Maps: every batch of a target shares it
            maps = self.maps._device = d(np.ascontiguousarray(self.maps.data, dtype=np.float64))
        npts, begin, end = (d(a) for a in self._grid())
        E, C, X = d(self.E), d(self.C), d(self.X)
        kept, evals = d(self.kept), d(self.evals)
        pool = cp.empty(self.pool_size, dtype=cp.float64)
        n = self.n_chains
        _cuda_kernel()(((n + block - 1) // block,), (block,),
                       (np.int64(n), np.int32(self.exh), npts, begin, end, np.float64(SLOPE), maps, d(self.off),
                        d(self.steps), d(self.seeds), d(self.atom_map), d(self.atom_body), d(self.local),
                        d(self.parent), d(self.origin_rel), d(self.axis_ref), d(self.root_origin), d(self.pairs),
                        d(self.pair_tab), d(self.smooth), d(self.dor), np.int32(N_TABLE), np.float64(self.min_rmsd),
                        np.int32(self.keep), E, C, X, kept, evals, pool))
        self.E, self.C, self.X = cp.asnumpy(E), cp.asnumpy(C), cp.asnumpy(X)
        self.kept, self.evals = cp.asnumpy(kept), cp.asnumpy(evals)
        return self.results()


# --fmad=false: no fused multiply-add, as the C build (-ffp-contract=off), so the GPU rounds like
# the CPU except inside CUDA's libm (sin, cos, exp, log), which differs from glibc by an ulp or so
CUDA_OPTIONS = ("--std=c++14", "--fmad=false")


@lru_cache(maxsize=None)
def _cuda_kernel():  # pragma: no cover - needs a GPU
    import cupy as cp

    return cp.RawModule(code=with_header(CUDA_SOURCE), options=CUDA_OPTIONS).get_function("vina_dock_batch_cuda")


def search_chains(models, seeds, steps, exh: int, min_rmsd: float, backend: str = "cpu",
                  threads: int = 1) -> list[ChainResults]:
    """Run every ligand's chains in one call on `backend` ('cpu' or 'cuda', as engine.backend chose)."""
    b = Batch(models, seeds, steps, exh, min_rmsd)
    if backend == "cuda":
        return b.run_cuda()
    if backend == "cpu":
        return b.run_cpu(threads)
    raise ValueError(f"docking search backend {backend!r}: runs on 'cpu' or 'cuda'")
