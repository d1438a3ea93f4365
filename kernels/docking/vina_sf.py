"""The AutoDock Vina scoring function: NumPy reference (the test oracle for the C kernels).

Pair energy between XS types t1, t2 at distance r < 8 Å, with surface distance d = r - R1 - R2:
  gauss1 exp(-(d/0.5)^2), gauss2 exp(-((d-3)/2)^2), repulsion d^2 (d < 0),
  hydrophobic (both hydrophobic) 1 → 0 linearly for d in [0.5, 1.5],
  hydrogen bond (donor–acceptor) 1 → 0 linearly for d in [-0.7, 0],
weighted by WEIGHTS. Vina evaluates pair energies from a table in r^2 (32 points per Å^2): the
value at r^2 is the mean of the two table points around it. Each ligand atom's summed energy
is "curled" (e > 0 becomes e·v/(v+e), v = 1000) and atoms outside the box are moved onto it and
pay 10^6 kcal/mol per Å outside. The final score divides the intermolecular energy by
1 + 0.05846 · N_rot (Vina's rotatable-bond normalisation). All of this follows Vina 1.2
(potentials.h, precalculate.h, non_cache.cpp, conf_independent.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.spatial import cKDTree

from .atom_types import N_XS, NO_XS, XS_ACCEPTOR, XS_DONOR, XS_HYDROPHOBIC, XS_RADIUS

TERMS = ("gauss1", "gauss2", "repulsion", "hydrophobic", "hydrogen_bond")
WEIGHTS = np.array([-0.035579, -0.005156, 0.840245, -0.035069, -0.587439])
W_ROT = 0.05846
CUTOFF = 8.0
CUTOFF_SQR = CUTOFF * CUTOFF
FACTOR = 32.0  # table points per Å^2
N_TABLE = int(FACTOR * CUTOFF_SQR) + 3
CURL_V = 1000.0
SLOPE = 1e6  # out-of-box penalty per Å (Vina compute_vina_maps / score)
GRANULARITY = 0.375


def _rs() -> np.ndarray:
    return np.sqrt(np.arange(N_TABLE) / FACTOR)


def term_values(t1: np.ndarray, t2: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Raw (unweighted) terms, shape (5, ...broadcast(t1, t2, r)); zero at r >= 8 Å."""
    t1, t2, r = np.broadcast_arrays(np.asarray(t1), np.asarray(t2), np.asarray(r, float))
    d = r - (XS_RADIUS[t1] + XS_RADIUS[t2])
    inside = r < CUTOFF
    g1 = np.exp(-((d / 0.5) ** 2))
    g2 = np.exp(-(((d - 3.0) / 2.0) ** 2))
    rep = np.where(d > 0.0, 0.0, d * d)
    hyd = np.where(d <= 0.5, 1.0, np.where(d >= 1.5, 0.0, (d - 1.5) / (0.5 - 1.5)))
    hyd = np.where(XS_HYDROPHOBIC[t1] & XS_HYDROPHOBIC[t2], hyd, 0.0)
    hb = np.where(d <= -0.7, 1.0, np.where(d >= 0.0, 0.0, d / -0.7))
    hb_ok = (XS_DONOR[t1] & XS_ACCEPTOR[t2]) | (XS_DONOR[t2] & XS_ACCEPTOR[t1])
    hb = np.where(hb_ok, hb, 0.0)
    return np.where(inside, np.stack([g1, g2, rep, hyd, hb]), 0.0)


def _fast(smooth: np.ndarray) -> np.ndarray:
    nxt = np.concatenate([smooth[..., 1:], np.zeros(smooth.shape[:-1] + (1,))], axis=-1)
    return (smooth + nxt) / 2.0


def _dor(smooth: np.ndarray, rs: np.ndarray) -> np.ndarray:
    d = np.zeros_like(smooth)
    d[..., 1:-1] = (smooth[..., 2:] - smooth[..., :-2]) / ((rs[2:] - rs[:-2]) * rs[1:-1])
    return d


@lru_cache(maxsize=8)
def tables(weights: tuple = tuple(WEIGHTS)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fast, smooth, dor) tables of the weighted pair energy, each (N_XS, N_XS, N_TABLE).

    Weights are summed term by term in Vina's order, so the table equals Vina's bit for bit."""
    rs = _rs()
    t = np.arange(N_XS)
    raw = term_values(t[:, None, None], t[None, :, None], rs[None, None, :])
    smooth = np.zeros(raw.shape[1:])
    for k in range(len(TERMS)):
        smooth = smooth + weights[k] * raw[k]
    return _fast(smooth), smooth, _dor(smooth, rs)


def term_fast_tables(t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """Per-term fast tables (5, m, N_TABLE) for the type pairs (t1[i], t2[i])."""
    return _fast(term_values(t1[:, None], t2[:, None], _rs()[None, :]))


@dataclass(frozen=True)
class Box:
    center: tuple[float, float, float]
    size: tuple[float, float, float]

    def grid(self, granularity: float = GRANULARITY) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(begin, end, n_points) as Vina lays out its grid: ceil(size/spacing) voxels, centred."""
        nv = np.ceil(np.asarray(self.size) / granularity).astype(int)
        span = granularity * nv
        begin = np.asarray(self.center) - span / 2.0
        return begin, begin + span, nv + 1


def _curl(e: np.ndarray, v: float = CURL_V) -> np.ndarray:
    return np.where(e > 0, e * (v / (v + e)), e)


class ReceptorIndex:
    """Receptor heavy atoms with a k-d tree for the 8 Å neighbour search."""

    def __init__(self, xyz: np.ndarray, xs: np.ndarray):
        self.xyz = np.asarray(xyz, float)
        self.xs = np.asarray(xs, np.int64)
        self.tree = cKDTree(self.xyz)

    def neighbours(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ligand atom index, receptor atom index) of every pair with r^2 < 64."""
        lists = self.tree.query_ball_point(p, CUTOFF)
        li = np.repeat(np.arange(len(p)), [len(x) for x in lists])
        rj = np.fromiter((j for x in lists for j in x), dtype=np.int64, count=len(li))
        return li, rj


def inter_energy(rec: ReceptorIndex, xyz: np.ndarray, xs: np.ndarray, box: Box | None,
                 weights=WEIGHTS, v: float = CURL_V) -> float:
    """Ligand–receptor energy from explicit receptor atoms (Vina's non_cache::eval)."""
    heavy = xs != NO_XS
    p = np.asarray(xyz, float)[heavy]
    t = np.asarray(xs)[heavy]
    pen = np.zeros(len(p))
    if box is not None:
        lo, hi, _ = box.grid()
        q = np.clip(p, lo, hi)
        pen = SLOPE * np.abs(p - q).sum(axis=1)
        p = q
    fast = tables(tuple(weights))[0]
    li, rj = rec.neighbours(p)
    r2 = ((p[li] - rec.xyz[rj]) ** 2).sum(axis=1)
    ok = r2 < CUTOFF_SQR
    li, rj, r2 = li[ok], rj[ok], r2[ok]
    e = fast[t[li], rec.xs[rj], (FACTOR * r2).astype(np.int64)]
    per_atom = np.bincount(li, weights=e, minlength=len(p))
    return float((_curl(per_atom, v) + pen).sum())


def intra_energy(xyz: np.ndarray, xs: np.ndarray, pairs: np.ndarray, weights=WEIGHTS, v: float = CURL_V) -> float:
    """Intramolecular ligand energy over the Vina pairs (each pair curled separately)."""
    if len(pairs) == 0:
        return 0.0
    fast = tables(tuple(weights))[0]
    a, b = pairs[:, 0], pairs[:, 1]
    r2 = ((xyz[a] - xyz[b]) ** 2).sum(axis=1)
    ok = r2 < CUTOFF_SQR
    e = fast[xs[a][ok], xs[b][ok], (FACTOR * r2[ok]).astype(np.int64)]
    return float(_curl(e, v).sum())


def inter_terms(rec: ReceptorIndex, xyz: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Raw sums of the five terms over ligand–receptor pairs (r < 8 Å), from the same tables."""
    heavy = xs != NO_XS
    p = np.asarray(xyz, float)[heavy]
    t = np.asarray(xs)[heavy]
    li, rj = rec.neighbours(p)
    r2 = ((p[li] - rec.xyz[rj]) ** 2).sum(axis=1)
    ok = r2 < CUTOFF_SQR
    li, rj, r2 = li[ok], rj[ok], r2[ok]
    pairs_t = t[li] * N_XS + rec.xs[rj]
    uniq, inv = np.unique(pairs_t, return_inverse=True)
    tab = term_fast_tables(uniq // N_XS, uniq % N_XS)  # (5, u, n)
    return tab[:, inv, (FACTOR * r2).astype(np.int64)].sum(axis=1)


def normalise(e: float, num_tors: float) -> float:
    """Vina's conf-independent term: e / (1 + w_rot N)."""
    return e / (1.0 + W_ROT * num_tors)


@dataclass
class Score:
    total: float  # kcal/mol, Vina's "affinity"
    inter: float
    intra: float
    torsional: float  # total - (inter + intra - unbound)
    terms: np.ndarray  # weighted per-term intermolecular energies (kcal/mol, before curl)


def score_pose(rec: ReceptorIndex, lig_xyz: np.ndarray, lig_xs: np.ndarray, pairs: np.ndarray, num_tors: float,
               box: Box | None, unbound: float | None = None, weights=WEIGHTS) -> Score:
    """Vina's score of one pose; `unbound` is the intramolecular energy of the reference pose
    (the best docked pose; for score_only the pose itself, which makes intra cancel)."""
    inter = inter_energy(rec, lig_xyz, lig_xs, box, weights)
    intra = intra_energy(lig_xyz, lig_xs, pairs, weights)
    u = intra if unbound is None else unbound
    total = normalise(inter + intra - u, num_tors)
    terms = np.asarray(weights) * inter_terms(rec, lig_xyz, lig_xs)
    return Score(total, inter, intra, total - (inter + intra - u), terms)
