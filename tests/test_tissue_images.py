"""Tissue geometry and fibre fields from image files (engine/tissue/images.py): NIfTI, NRRD, .npy/.npz.

The expected layout is derived independently of the reader: every stored voxel's world position
comes from the file's own voxel-to-world matrix (nibabel's apply_affine for NIfTI; origin + index x
space directions for NRRD, LPS turned into RAS by negating x and y), and the job grid index is that
position's offset from the lowest corner divided by dx. The reader must put each stored value at
exactly that index. End to end, the same slab given as a box, a .npy mask, a NIfTI label map
(permuted, flipped axes) and an LPS NRRD with a fibre image runs to bit-identical activation maps.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from nibabel.affines import apply_affine

from engine.config import load_job
from engine.errors import JobError
from engine.tissue import images
from engine.tissue.setup import make_plan
from engine.tissue.simulate import simulate
from kernels.tissue.build import tissue_kernels

ROOT = Path(__file__).resolve().parents[1]
TP06 = ROOT / "tests" / "data" / "cardiac" / "ten_tusscher_model_2006_epi.cellml"
DX = 0.25

# voxel-to-world (RAS mm) linear parts: identity-like, flipped axes, permuted axes, both
AFFINES = {
    "ras": np.diag([DX, DX, DX]),
    "flipped": np.diag([-DX, DX, -DX]),
    "permuted": np.array([[0, DX, 0], [0, 0, DX], [DX, 0, 0]], float),
    "permuted_flipped": np.array([[0, 0, -DX], [-DX, 0, 0], [0, DX, 0]], float),
}


def _expected_index(world: np.ndarray) -> np.ndarray:
    """Job grid index of world points [N, 3] (RAS mm): offset from the lowest corner / dx."""
    return np.rint((world - world.min(axis=0)) / DX).astype(int)


def _stored(shape=(5, 4, 3)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.int32).reshape(shape) + 1  # every voxel distinct


def _ijk(shape):
    return np.indices(shape).reshape(3, -1).T


def _nifti(path: Path, data: np.ndarray, lin: np.ndarray, origin=(10.0, -4.0, 7.5)) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3], aff[:3, 3] = lin, origin
    nib.save(nib.Nifti1Image(data, aff), str(path))
    return aff


@pytest.mark.parametrize("name", list(AFFINES))
def test_nifti_voxels_land_where_their_world_position_says(tmp_path, name):
    data = _stored()
    aff = _nifti(tmp_path / f"{name}.nii.gz", data, AFFINES[name])
    vol = images.read(tmp_path / f"{name}.nii.gz", vector=False, npz_keys=())
    ijk = _ijk(data.shape)
    idx = _expected_index(apply_affine(aff, ijk))
    assert vol.data.shape == tuple(idx.max(axis=0) + 1)
    assert np.array_equal(vol.data[tuple(idx.T)], data[tuple(ijk.T)])
    assert vol.spacing == pytest.approx((DX, DX, DX))


@pytest.mark.parametrize("space, sign", [("right-anterior-superior", (1, 1, 1)), ("left-posterior-superior", (-1, -1, 1))])
@pytest.mark.parametrize("name", ["ras", "permuted_flipped"])
def test_nrrd_voxels_land_where_their_world_position_says(tmp_path, space, sign, name):
    data = _stored()
    sd = AFFINES[name].T  # NRRD: one row per array axis, its step in the file's space
    origin = np.array([3.0, 2.0, -1.0])
    nrrd.write(str(tmp_path / "v.nrrd"), data, {"space": space, "space directions": sd, "space origin": origin})
    vol = images.read(tmp_path / "v.nrrd", vector=False, npz_keys=())
    ijk = _ijk(data.shape)
    world = (origin + ijk @ sd) * np.array(sign, float)  # file space -> RAS
    idx = _expected_index(world)
    assert np.array_equal(vol.data[tuple(idx.T)], data[tuple(ijk.T)])


def _field(world: np.ndarray) -> np.ndarray:
    """A unit fibre field that varies with position (RAS components)."""
    th = 0.3 * world[:, 0] + 0.2 * world[:, 1]
    v = np.stack([np.cos(th), np.sin(th), 0.3 + 0.05 * world[:, 2]], axis=1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("five_d", [False, True])
@pytest.mark.parametrize("name", ["flipped", "permuted_flipped"])
def test_nifti_fibre_vectors_keep_their_world_components(tmp_path, name, five_d):
    shape = (5, 4, 3)
    aff = np.eye(4)
    aff[:3, :3] = AFFINES[name]
    ijk = _ijk(shape)
    world = apply_affine(aff, ijk)
    vec = _field(world)
    data = np.zeros((*shape, 3))
    data[tuple(ijk.T)] = vec
    if five_d:
        data = data[:, :, :, None, :]
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "f.nii"))
    vol = images.read(tmp_path / "f.nii", vector=True, npz_keys=())
    idx = _expected_index(world)
    np.testing.assert_array_equal(vol.data[tuple(idx.T)], vec)


def test_nrrd_lps_fibre_vectors_become_ras_components(tmp_path):
    shape = (5, 4, 3)
    sd = AFFINES["permuted"].T
    ijk = _ijk(shape)
    world_lps = ijk @ sd
    world = world_lps * np.array([-1.0, -1.0, 1.0])
    vec = _field(world)  # RAS components
    stored = np.zeros((3, *shape))  # vector axis first, as 3D Slicer writes it
    stored[(slice(None), *ijk.T)] = (vec * np.array([-1.0, -1.0, 1.0])).T  # the file holds LPS components
    sdir = np.vstack([np.full(3, np.nan), sd])
    nrrd.write(str(tmp_path / "f.nrrd"), stored, {"space": "left-posterior-superior", "space directions": sdir,
                                                  "kinds": ["vector", "domain", "domain", "domain"]})
    vol = images.read(tmp_path / "f.nrrd", vector=True, npz_keys=())
    np.testing.assert_allclose(vol.data[tuple(_expected_index(world).T)], vec, rtol=0, atol=0)
    nrrd.write(str(tmp_path / "mf.nrrd"), stored, {"space": "left-posterior-superior", "space directions": sdir,
                                                   "measurement frame": np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])})
    with pytest.raises(images.ImageError, match="measurement frame"):
        images.read(tmp_path / "mf.nrrd", vector=True, npz_keys=())


# ------------------------------------------------------------------ through the job (key and value named)
def _job(tmp_path: Path, geometry: str, fibres: str = "direction = [1.0, 0.5, 0.2]", dx: float = DX,
         stim_lo=(0.0, 0.0, 0.0)) -> Path:
    (tmp_path / TP06.name).write_bytes(TP06.read_bytes())
    lo = list(stim_lo)
    hi = [lo[0] + 1.0, lo[1] + 1.0, lo[2] + 0.5]
    p = tmp_path / "job.toml"
    p.write_text(f"""
[job]
name = "image_geometry"
backend = "cpu"

[tissue]
dx = {dx}
dt = 0.02
end_time = 12.0

[tissue.cell]
file = "{TP06.name}"

[tissue.geometry]
{geometry}

[tissue.conductivity]
sigma_long = 0.133418
sigma_trans = 0.017606

[tissue.fibres]
{fibres}

[[tissue.stimuli]]
lo_mm = {lo}
hi_mm = {hi}
current = 50.0
""")
    return p


def _plan_error(tmp_path, geometry, fibres="direction = [1.0, 0.5, 0.2]", dx=DX) -> str:
    with pytest.raises(JobError) as e:
        make_plan(load_job(_job(tmp_path, geometry, fibres, dx)))
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_label_maps_and_bad_images_give_one_line_errors_naming_key_and_value(tmp_path):
    lab = np.zeros((6, 5, 4), np.int16)
    lab[1:5, 1:4, 1:3] = 2  # myocardium
    lab[2:4, 2, 1:3] = 7  # blood pool inside it
    _nifti(tmp_path / "lab.nii.gz", lab, np.diag([DX] * 3))
    plan = make_plan(load_job(_job(tmp_path, 'file = "lab.nii.gz"\nlabels = [2, 5]', stim_lo=(0.25, 0.25, 0.25))))
    assert np.array_equal(plan.geom.mask, lab == 2)  # label 5 absent: fine while one label is present
    m = _plan_error(tmp_path, 'file = "lab.nii.gz"\nlabels = [3, 5]')
    assert "tissue.geometry.file" in m and "lab.nii.gz" in m and "none of labels [3, 5]" in m
    m = _plan_error(tmp_path, 'file = "lab.nii.gz"')
    assert "tissue.geometry.labels" in m and "not a boolean mask" in m
    m = _plan_error(tmp_path, 'file = "lab.nii.gz"\nlabels = [2]', dx=0.5)
    assert "'tissue.dx' = 0.5" in m and "0.25" in m
    _nifti(tmp_path / "aniso.nii", lab, np.diag([DX, DX, 2 * DX]))
    assert "anisotropic voxel spacing" in _plan_error(tmp_path, 'file = "aniso.nii"\nlabels = [2]')
    c, s = np.cos(0.3), np.sin(0.3)
    _nifti(tmp_path / "oblique.nii", lab, DX * np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]))
    assert "oblique" in _plan_error(tmp_path, 'file = "oblique.nii"\nlabels = [2]')
    # float32 header rounding of the spacing is accepted
    _nifti(tmp_path / "f32.nii", (lab == 2).astype(np.uint8), np.diag([np.float32(0.2500001)] * 3))
    assert make_plan(load_job(_job(tmp_path, 'file = "f32.nii"', stim_lo=(0.25, 0.25, 0.25)))).geom.mask.sum() == (lab == 2).sum()
    np.savez(tmp_path / "two.npz", a=lab == 2, b=lab == 7)
    assert "name one of them" in _plan_error(tmp_path, 'file = "two.npz"')
    np.savez(tmp_path / "named.npz", mask=lab == 2, other=lab)
    assert make_plan(load_job(_job(tmp_path, 'file = "named.npz"', stim_lo=(0.25, 0.25, 0.25)))).geom.mask.sum() == (lab == 2).sum()
    (tmp_path / "mask.mha").write_bytes(b"x")
    assert "unsupported file type '.mha'" in _plan_error(tmp_path, 'file = "mask.mha"')
    assert "file not found" in _plan_error(tmp_path, 'file = "missing.nii.gz"')
    np.save(tmp_path / "box.npy", np.ones((13, 7, 3), bool))
    np.save(tmp_path / "fib.npy", np.zeros((3, 13, 7, 3)))
    m = _plan_error(tmp_path, 'file = "box.npy"', fibres='file = "fib.npy"')
    assert "tissue.fibres.file" in m and "zero or non-finite fibre vectors" in m


def test_same_slab_from_box_npy_nifti_labels_and_nrrd_runs_bit_identically(tmp_path):
    """A 3 x 1.5 x 0.5 mm TP06 slab (13 x 7 x 3 nodes) with oblique fibres (19-point stencil):
    as a box; as a .npy mask; embedded one voxel deep in a NIfTI label map with a permuted, flipped
    affine (tissue labels 1 and 2, background 0: the mask surface is the no-flux boundary, as the
    box's faces are); as an LPS NRRD with the fibres given as a NIfTI vector image. The activation
    maps of the tissue must be bit-identical: the same voxels with the same neighbours do the same
    arithmetic wherever the grid comes from."""
    shape = (13, 7, 3)
    fib = np.array([1.0, 0.5, 0.2]) / np.linalg.norm([1.0, 0.5, 0.2])

    def run(d: Path, geometry: str, fibres: str = "direction = [1.0, 0.5, 0.2]", off=0):
        d.mkdir()
        plan = make_plan(load_job(_job(d, geometry, fibres, stim_lo=(off * DX,) * 3)))
        r = simulate(plan.geom, plan.model, plan.params, tissue_kernels(plan.model, "cpu"), plan.stimuli, 0.02, 12.0,
                     thr_act=0.0)
        a = r.maps.activation
        return a[off:off + shape[0], off:off + shape[1], off:off + shape[2]], plan

    ref, _ = run(tmp_path / "box", "size_mm = [3.0, 1.5, 0.5]")
    assert np.isfinite(ref).sum() > ref.size // 4  # the wave got going

    d = tmp_path / "npy"
    d.mkdir()
    np.save(d / "m.npy", np.ones(shape, bool))
    got, _ = run(d / "r", 'file = "../m.npy"')
    assert np.array_equal(got, ref, equal_nan=True)

    # NIfTI label map: RAS array (embedded, labels 1/2) stored through a permuted, flipped affine
    ras = np.zeros((shape[0] + 2, shape[1] + 2, shape[2] + 2), np.uint8)
    ras[1:-1, 1:-1, 1:-1] = 1
    ras[7:-1, 1:-1, 1:-1] = 2
    lin = AFFINES["permuted_flipped"]  # array axis a runs along world axis w(a), sign s(a)
    aff = np.eye(4)
    aff[:3, :3] = lin
    w = np.argmax(np.abs(lin), axis=0)
    stored = np.transpose(ras, w)  # stored axis a = RAS axis w(a) ...
    for a in range(3):
        if lin[w[a], a] < 0:
            stored = np.flip(stored, axis=a)  # ... counted from the high end where the step is negative
    nib.save(nib.Nifti1Image(stored, aff), str(tmp_path / "labels.nii.gz"))
    # the expected placement, independently: world positions of the stored voxels
    ijk = _ijk(stored.shape)
    idx = _expected_index(apply_affine(aff, ijk))
    assert np.array_equal(ras[tuple(idx.T)], stored[tuple(ijk.T)])
    d = tmp_path / "nii"
    d.mkdir()
    (d / "labels.nii.gz").write_bytes((tmp_path / "labels.nii.gz").read_bytes())
    got, plan = run(d / "r", 'file = "../labels.nii.gz"\nlabels = [1, 2]', off=1)
    assert plan.geom.mask.sum() == np.prod(shape)
    assert np.array_equal(got, ref, equal_nan=True)

    # LPS NRRD mask (x and y run towards -x, -y of RAS) and a NIfTI fibre image
    lps = np.flip(np.ones(shape, np.uint8), axis=(0, 1))
    d = tmp_path / "nrrd"
    d.mkdir()
    nrrd.write(str(d / "m.nrrd"), lps, {"space": "left-posterior-superior",
                                         "space directions": np.diag([DX, DX, DX]), "space origin": np.zeros(3)})
    vec = np.broadcast_to(fib, (*shape, 3)).copy()
    nib.save(nib.Nifti1Image(vec, np.diag([DX, DX, DX, 1.0])), str(d / "fib.nii.gz"))
    got, plan = run(d / "r", 'file = "../m.nrrd"', fibres='file = "../fib.nii.gz"')
    np.testing.assert_allclose(plan.geom.fibres[:, 0, 0, 0], fib, rtol=0, atol=1e-15)
    assert np.array_equal(got, ref, equal_nan=True)  # (the file's unit vectors normalise to the same bits)
