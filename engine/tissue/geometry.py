"""Voxel geometry, fibres, the diffusivity tensor, and the explicit-diffusion stability limit.

Grid: node (i, j, k) sits at (i*dx, j*dx, k*dx) mm; a box of L mm has round(L/dx) + 1 nodes along
that axis (vertex-centred, as finite-element codes for the Niederer benchmark number their nodes).
Monodomain diffusivity D = sigma / (chi * Cm): with sigma in S/m, chi in 1/mm and Cm in uF/mm^2,
D [mm^2/ms] = sigma * 1e-3 / (chi * Cm * 1e-6) * 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def diffusivity(sigma_S_per_m: float, chi_per_mm: float, cm_uF_per_mm2: float) -> float:
    """mm^2/ms. sigma [S/m] = 1e-3 S/mm; chi*Cm [uF/mm^3] = 1e-6 F/mm^3; S/F = 1/s = 1e-3 /ms."""
    return sigma_S_per_m * 1e-3 / (chi_per_mm * cm_uF_per_mm2 * 1e-6) * 1e-3


def harmonic_mean(a: float, b: float) -> float:
    """Monodomain conductivity from intra- and extracellular ones: a*b/(a+b)."""
    return a * b / (a + b)


def box_shape(size_mm, dx: float) -> tuple[int, int, int]:
    n = []
    for L in size_mm:
        k = L / dx
        if abs(k - round(k)) > 1e-6 * max(1.0, k):
            raise ValueError(f"size {L} mm is not a whole number of dx = {dx} mm steps")
        n.append(int(round(k)) + 1)
    return tuple(n)


@dataclass
class Geometry:
    """Global grid: mask [NX, NY, NZ] bool, fibre direction [3, NX, NY, NZ] unit vectors, spacing."""

    mask: np.ndarray
    fibres: np.ndarray
    dx: float
    d_long: float  # mm^2/ms along the fibre
    d_trans: float  # across

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mask.shape)

    def tensor(self) -> list[np.ndarray]:
        """Dxx, Dyy, Dzz, Dxy, Dxz, Dyz [NX, NY, NZ]: D = Dt I + (Dl - Dt) f f^T."""
        f = self.fibres
        dd = self.d_long - self.d_trans
        return [self.d_trans + dd * f[0] * f[0], self.d_trans + dd * f[1] * f[1], self.d_trans + dd * f[2] * f[2],
                dd * f[0] * f[1], dd * f[0] * f[2], dd * f[1] * f[2]]

    def has_cross(self) -> bool:
        return bool(any(np.any(t != 0) for t in self.tensor()[3:]))


def uniform_fibres(shape, direction) -> np.ndarray:
    d = np.asarray(direction, float)
    n = np.linalg.norm(d)
    if not np.isfinite(n) or n == 0:
        raise ValueError(f"fibre direction {list(direction)} must be a non-zero vector")
    return np.broadcast_to((d / n)[:, None, None, None], (3, *shape)).copy()


def max_stable_dt(geom: Geometry) -> float:
    """Largest forward-Euler diffusion step the discrete operator allows (Gershgorin bound).

    For constant D the stencil's row sum of |weights| is 4*sum_a D_aa/h^2 + 2*sum_{a<b} |D_ab|/h^2,
    so |lambda| <= that and forward Euler is stable for dt <= 2/|lambda|. For diagonal D this is the
    exact limit h^2 / (2 * sum_a D_aa) of the 7-point stencil (its highest Fourier mode)."""
    D = geom.tensor()
    m = geom.mask
    h2 = geom.dx ** 2
    bound = (4 * (D[0] + D[1] + D[2]) + 2 * (np.abs(D[3]) + np.abs(D[4]) + np.abs(D[5]))) / h2
    lam = float(bound[m].max()) if m.any() else 0.0
    return np.inf if lam == 0 else 2.0 / lam


def box_region(shape, dx: float, lo_mm, hi_mm) -> np.ndarray:
    """Nodes whose coordinates lie in [lo, hi] (mm, inclusive up to round-off)."""
    out = np.ones(shape, bool)
    eps = 1e-9 * dx
    for a in range(3):
        x = np.arange(shape[a]) * dx
        sel = (x >= lo_mm[a] - eps) & (x <= hi_mm[a] + eps)
        idx = [None, None, None]
        idx[a] = slice(None)
        out &= sel[tuple(idx)]
    return out


def sphere_region(shape, dx: float, centre_mm, radius_mm: float) -> np.ndarray:
    g = np.meshgrid(*[np.arange(n) * dx for n in shape], indexing="ij")
    r2 = sum((g[a] - centre_mm[a]) ** 2 for a in range(3))
    return r2 <= radius_mm ** 2 + 1e-9 * dx


def node_of(point_mm, dx: float, shape) -> tuple[int, int, int]:
    idx = tuple(int(round(p / dx)) for p in point_mm)
    for a, (i, n) in enumerate(zip(idx, shape)):
        if not 0 <= i < n:
            raise ValueError(f"point {list(point_mm)} mm is outside the grid (axis {a}: node {i} of {n})")
    return idx
