"""Turn a validated `[tissue]` job into solver inputs: cell model, geometry, stimuli, electrodes."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from engine.errors import JobError

from . import images
from .config import Region, StimulusSection, TissueSection
from .geometry import (Geometry, box_region, box_shape, diffusivity, harmonic_mean, max_stable_dt, node_of,
                       sphere_region, uniform_fibres)
from .solver import Stimulus


@lru_cache(maxsize=8)
def _import(path: str, mtime: float):  # noqa: ARG001 - mtime keys the cache on the file's version
    from kernels.ode.cellml import import_cellml, import_mmt

    return import_mmt(path) if path.endswith(".mmt") else import_cellml(path)


def cell_model(loaded, ts: TissueSection):
    p = loaded.resolve(ts.cell.file)
    if not p.is_file():
        raise JobError(f"key 'tissue.cell.file' = {ts.cell.file!r}: file not found ({p})")
    if p.suffix not in (".cellml", ".mmt"):
        raise JobError(f"key 'tissue.cell.file' = {ts.cell.file!r}: expected a .cellml or .mmt file")
    try:
        model = _import(str(p), p.stat().st_mtime)
    except ValueError as e:
        raise JobError(f"key 'tissue.cell.file' = {ts.cell.file!r}: {e}") from None
    names = model.parameter_names
    params = np.array([q.default for q in model.parameters], float)
    for k, v in ts.cell.parameters.items():
        if k not in names:
            raise JobError(f"key 'tissue.cell.parameters.{k}': model {model.name} has no parameter {k!r}")
        params[names.index(k)] = v
    if "i_stim_amp" not in model.input_names:
        raise JobError(f"key 'tissue.cell.file' = {ts.cell.file!r}: no stimulus current found in the model")
    return model, params


def geometry(loaded, ts: TissueSection) -> Geometry:
    g, c = ts.geometry, ts.conductivity
    if g.size_mm is not None:
        try:
            shape = box_shape(g.size_mm, ts.dx)
        except ValueError as e:
            raise JobError(f"key 'tissue.geometry.size_mm' = {g.size_mm}: {e}") from None
        mask = np.ones(shape, bool)
    else:
        mask = _mask_file(loaded, ts)
        shape = mask.shape
    if c.sigma_long is not None:
        sl, st = c.sigma_long, c.sigma_trans
    else:
        sl, st = harmonic_mean(c.sigma_il, c.sigma_el), harmonic_mean(c.sigma_it, c.sigma_et)
    f = ts.fibres
    if f.direction is not None:
        fib = uniform_fibres(shape, f.direction)
    else:
        fib = _fibre_file(loaded, ts, shape, mask)
    return Geometry(mask, fib, ts.dx, diffusivity(sl, c.chi, c.cm), diffusivity(st, c.chi, c.cm))


def _mask_file(loaded, ts: TissueSection) -> np.ndarray:
    g = ts.geometry
    key = f"key 'tissue.geometry.file' = {g.file!r}"
    try:
        vol = images.read(loaded.resolve(g.file), vector=False, npz_keys=("mask", "labels"))
        images.check_spacing(vol, ts.dx)
        if vol.data.ndim != 3:
            raise images.ImageError(f"need a 3-D array, got {vol.data.ndim}-D shape {vol.data.shape}")
        mask = images.tissue_mask(vol.data, g.labels)
    except images.ImageError as e:
        raise JobError(f"{key}: {e}") from None
    if not mask.any():
        raise JobError(f"{key}: the mask has no tissue voxel")
    return np.ascontiguousarray(mask)


def _fibre_file(loaded, ts: TissueSection, shape, mask) -> np.ndarray:
    f = ts.fibres
    key = f"key 'tissue.fibres.file' = {f.file!r}"
    try:
        vol = images.read(loaded.resolve(f.file), vector=True, npz_keys=("fibres", "fibers"))
        images.check_spacing(vol, ts.dx)
    except images.ImageError as e:
        raise JobError(f"{key}: {e}") from None
    # NumPy arrays are [3, NX, NY, NZ]; image readers return components last
    numpy_file = images.suffix(Path(f.file)) in (".npy", ".npz")
    fib = (vol.data if numpy_file else np.moveaxis(vol.data, -1, 0)).astype(float)
    if fib.shape != (3, *shape):
        raise JobError(f"{key}: shape {fib.shape} (components first), need {(3, *shape)} like the geometry")
    fib = np.where(mask[None], fib, 0.0)  # outside the tissue vectors are unused (may be 0 or NaN)
    n = np.linalg.norm(fib, axis=0)
    if np.any(n[mask] == 0) or not np.all(np.isfinite(fib)):
        raise JobError(f"{key}: zero or non-finite fibre vectors in tissue")
    return np.ascontiguousarray(fib / np.where(n == 0, 1, n))


def region_mask(r: Region, shape, dx: float) -> np.ndarray:
    if r.lo_mm is not None:
        return box_region(shape, dx, r.lo_mm, r.hi_mm)
    return sphere_region(shape, dx, r.centre_mm, r.radius_mm)


def stimulus_sign(model, params) -> float:
    """+1 or -1: the sign the model's own stimulus amplitude has (depolarising current)."""
    names = model.parameter_names
    if "stim_amplitude" in names and params[names.index("stim_amplitude")] > 0:
        return 1.0
    return -1.0  # the usual convention: dV/dt = -(I_ion + I_stim), so a depolarising I_stim < 0


def stimuli(ts: TissueSection, geom: Geometry, model, params, specs: list[StimulusSection] | None = None,
            key: str = "tissue.stimuli") -> list[Stimulus]:
    sign = stimulus_sign(model, params)
    scale = 1.0 / (ts.conductivity.chi * ts.conductivity.cm)  # uA/mm^3 -> uA/uF = A/F
    out = []
    for i, s in enumerate(specs if specs is not None else ts.stimuli):
        reg = region_mask(s, geom.shape, geom.dx) & geom.mask
        if not reg.any():
            raise JobError(f"key '{key}[{i}]': the region contains no tissue voxel")
        out.append(Stimulus(reg, s.start, s.duration, sign * s.current * scale, s.period, s.count))
    return out


def check_stability(ts: TissueSection, geom: Geometry) -> float:
    lim = max_stable_dt(geom)
    h = ts.dt / ts.diffusion_substeps
    if h > lim:
        need = int(np.ceil(ts.dt / lim))
        raise JobError(f"key 'tissue.dt' = {ts.dt}: unstable for dx = {ts.dx} mm: the explicit diffusion step "
                       f"dt/diffusion_substeps = {h:.6g} ms exceeds the stability limit {lim:.6g} ms; lower dt or "
                       f"set tissue.diffusion_substeps >= {need}")
    return lim


def points(ts: TissueSection, geom: Geometry) -> dict[str, tuple[int, int, int]]:
    out = {}
    for name, p in ts.outputs.points.items():
        try:
            out[name] = node_of(p, geom.dx, geom.shape)
        except ValueError as e:
            raise JobError(f"key 'tissue.outputs.points.{name}' = {p}: {e}") from None
    return out


@dataclass
class Plan:
    model: object
    params: np.ndarray
    geom: Geometry
    stimuli: list[Stimulus]
    points: dict
    dt_limit: float


def make_plan(loaded) -> Plan:
    ts = loaded.job.tissue
    model, params = cell_model(loaded, ts)
    geom = geometry(loaded, ts)
    lim = check_stability(ts, geom)
    return Plan(model, params, geom, stimuli(ts, geom, model, params), points(ts, geom), lim)


def job_dir(loaded) -> Path:
    return loaded.base_dir
