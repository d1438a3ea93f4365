"""Voxel geometry and fibre fields from image files: NumPy (.npy/.npz), NIfTI (.nii/.nii.gz), NRRD (.nrrd).

The job's axes are the image's world axes in RAS+ orientation (x towards the subject's right,
y anterior, z superior), with the grid's node (0, 0, 0) at the image corner lowest on all three.
A NIfTI affine or an NRRD `space directions` matrix says which array axis runs along which world
axis and in which sense; the array is transposed and flipped so that its axes are x, y, z in that
order (an LPS-space NRRD has x and y negated). Oblique images (array axes not along world axes)
would need resampling and are refused. .npy/.npz arrays carry no header: their axes are x, y, z.

Fibre vectors (3 components per voxel) are taken to be in the same world frame as the file's
space (RAS for NIfTI; the NRRD `space`, whose measurement frame must be the identity), so they are
converted to RAS components and need no change when the array is reoriented.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUFFIXES = (".npy", ".npz", ".nii", ".nii.gz", ".nrrd")

# NRRD `space` names -> sign of each axis relative to RAS
_NRRD_SPACES = {"right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
                "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
                "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1)}


class ImageError(ValueError):
    """Unreadable or unsupported image; the caller prefixes the job key and value."""


@dataclass
class Volume:
    data: np.ndarray  # [NX, NY, NZ] or [NX, NY, NZ, 3] (vector components last), axes = job x, y, z
    spacing: tuple[float, float, float] | None  # mm per voxel along x, y, z; None: no header (.npy/.npz)


def suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read(path: Path, vector: bool, npz_keys: tuple[str, ...]) -> Volume:
    """A scalar (vector=False) or 3-component (vector=True) volume with axes x, y, z."""
    s = suffix(path)
    if s not in SUFFIXES:
        raise ImageError(f"unsupported file type {s or '(none)'!r}; use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise ImageError(f"file not found ({path})")
    if s in (".npy", ".npz"):
        return Volume(_numpy(path, s, npz_keys), None)
    if s in (".nii", ".nii.gz"):
        return _nifti(path, vector)
    return _nrrd(path, vector)


def _numpy(path: Path, s: str, keys: tuple[str, ...]) -> np.ndarray:
    try:
        if s == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            pick = next((k for k in keys if k in names), names[0] if len(names) == 1 else None)
            if pick is None:
                raise ImageError(f"the .npz holds arrays {names}: name one of them {' or '.join(keys)}")
            return z[pick]
    except (OSError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"cannot read a NumPy array ({e})") from None


def _nifti(path: Path, vector: bool) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel raises several unrelated types for bad files
        raise ImageError(f"cannot read NIfTI ({e.__class__.__name__}: {e})") from None
    if vector:
        if data.ndim == 5 and data.shape[3] == 1:  # NIfTI's vector intent puts components in dim 5
            data = data[:, :, :, 0, :]
        if data.ndim != 4 or data.shape[3] != 3:
            raise ImageError(f"need a vector image of shape (X, Y, Z, 3) or (X, Y, Z, 1, 3), got {data.shape}")
    elif data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    A = np.asarray(img.affine, float)[:3, :3]
    return _reorient(data, A)


def _nrrd(path: Path, vector: bool) -> Volume:
    import nrrd

    try:
        data, hdr = nrrd.read(str(path))  # index order 'F': array axes in the header's axis order
    except Exception as e:  # noqa: BLE001 - pynrrd raises NRRDError and others for bad files
        raise ImageError(f"cannot read NRRD ({e.__class__.__name__}: {e})") from None
    nd = data.ndim
    if "space directions" in hdr and hdr["space directions"] is not None:
        sd = np.asarray(hdr["space directions"], float)  # one row per axis; NaN rows: non-spatial axes
        spatial = [a for a in range(nd) if np.all(np.isfinite(sd[a]))]
        space = str(hdr.get("space", "")).lower()
        if sd.shape[1] != 3 or len(spatial) != 3:
            raise ImageError(f"need 3 spatial axes in a 3-D space, got space directions {sd.tolist()}")
        if space not in _NRRD_SPACES:
            raise ImageError(f"unsupported NRRD space {hdr.get('space')!r}; use one of "
                             f"{', '.join(k for k in _NRRD_SPACES if '-' in k)}")
        sign = np.array(_NRRD_SPACES[space], float)
        A = sign[:, None] * sd[spatial].T  # columns: RAS world step of each spatial axis
        mf = hdr.get("measurement frame")
        if vector and mf is not None and not np.allclose(np.asarray(mf, float), np.eye(3), atol=1e-9):
            # rare for fibre fields, and tools disagree on whether its vectors are rows or columns
            raise ImageError(f"measurement frame {np.asarray(mf, float).tolist()} is not supported: store the "
                             f"fibre vectors in the image's space (identity measurement frame)")
        comp = np.diag(sign)  # vector components in the file's space -> RAS
    else:  # no orientation: index space, spacings along the array axes
        spatial = list(range(min(nd, 3)))
        sp = np.asarray(hdr.get("spacings", [np.nan] * nd), float)
        sp = np.where(np.isfinite(sp), sp, 1.0) if "spacings" in hdr else np.full(nd, np.nan)
        if vector and nd == 4:  # the component axis is the one of length 3 with no spacing
            kinds = [str(k).lower() for k in hdr.get("kinds", [""] * nd)]
            vec = next((a for a in range(nd) if "vector" in kinds[a] or "covariant" in kinds[a]), 0)
            spatial = [a for a in range(nd) if a != vec]
        A = np.diag(sp[spatial]) if np.all(np.isfinite(sp[spatial])) else None
        comp = np.eye(3)
    others = [a for a in range(nd) if a not in spatial]
    if vector:
        if len(others) != 1 or data.shape[others[0]] != 3:
            raise ImageError(f"need a 3-component vector image (one non-spatial axis of length 3), got shape {data.shape}")
        data = np.moveaxis(data, others[0], -1) @ comp.T  # components last, in RAS
    else:
        if others and all(data.shape[a] == 1 for a in others):
            data = data.reshape([data.shape[a] for a in spatial])
        elif others:
            raise ImageError(f"need a scalar 3-D image, got shape {data.shape}")
    if A is None:
        return Volume(np.ascontiguousarray(data), None)
    return _reorient(data, A)


def _reorient(data: np.ndarray, A: np.ndarray) -> Volume:
    """Transpose/flip the 3 spatial (leading) axes of `data` so that axis w runs along +world axis w.
    A's column a is the world displacement (mm, RAS) of one step along array axis a."""
    if data.ndim < 3:
        raise ImageError(f"need a 3-D image, got {data.ndim}-D shape {data.shape}")
    norms = np.linalg.norm(A, axis=0)
    if np.any(norms == 0) or not np.all(np.isfinite(A)):
        raise ImageError(f"degenerate voxel-to-world matrix {A.tolist()}")
    world = np.argmax(np.abs(A), axis=0)  # world axis of each array axis
    off = np.abs(A) / norms
    off[world, range(3)] = 0.0
    if sorted(world) != [0, 1, 2] or off.max() > 1e-4:
        raise ImageError("the image is oblique (its voxel axes are not along the world axes): resample it onto "
                         f"an axis-aligned grid first (voxel-to-world matrix {np.round(A, 6).tolist()})")
    order = [int(np.flatnonzero(world == w)[0]) for w in range(3)]  # array axis that becomes axis w
    data = np.transpose(data, order + list(range(3, data.ndim)))
    for w, a in enumerate(order):
        if A[w, a] < 0:
            data = np.flip(data, axis=w)
    spacing = tuple(float(norms[a]) for a in order)
    return Volume(np.ascontiguousarray(data), spacing)


def check_spacing(vol: Volume, dx: float) -> None:
    """Refuse anisotropic voxels and a spacing that differs from tissue.dx (relative 1e-5: headers
    store float32)."""
    if vol.spacing is None:
        return
    sp = vol.spacing
    if max(sp) - min(sp) > 1e-5 * max(sp):
        raise ImageError(f"anisotropic voxel spacing {[round(s, 6) for s in sp]} mm (x, y, z) is not supported: "
                         f"the solver's grid has one spacing tissue.dx on every axis; resample the image to "
                         f"isotropic voxels")
    if abs(sp[0] - dx) > 1e-5 * dx:
        raise ImageError(f"its voxel spacing {sp[0]:.6g} mm differs from key 'tissue.dx' = {dx} mm; set tissue.dx "
                         f"to the image's spacing or resample the image")


def tissue_mask(data: np.ndarray, labels: list[int] | None) -> np.ndarray:
    """Boolean mask: voxels whose label is in `labels`, or (no labels) a boolean / 0-1 image."""
    if labels is not None:
        if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)
                or data.dtype == bool):
            raise ImageError(f"a label map must hold numbers, got {data.dtype}")
        found = sorted(int(v) for v in np.unique(data) if float(v).is_integer())
        missing = [v for v in labels if v not in found]
        if len(missing) == len(labels):
            raise ImageError(f"none of labels {labels} occurs in the image (labels present: {found[:20]})")
        return np.isin(data, labels)
    if data.dtype == bool:
        return data
    u = np.unique(data)
    if np.all(np.isin(u, [0, 1])):
        return data == 1
    raise ImageError(f"values {u[:10].tolist()}{'...' if u.size > 10 else ''} are not a boolean mask: give "
                     "tissue.geometry.labels to choose the tissue labels of a label map")
