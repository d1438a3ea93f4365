"""Tissue slabs over real MPI ranks (`mpiexec -n 2` / `-n 4`): results equal the one-rank run.

Every voxel's arithmetic is the same whatever the decomposition, so the activation/APD maps and
the V traces must be bit-identical; the pseudo-ECG is a sum over voxels reduced in a different
order per rank count, so it is compared at 1e-12 relative (round-off of a ~1e4-term sum)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.helpers import MPIEXEC, mpi_cmd, run_twin
from tests.tissue_helpers import SLAB_JOB

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed")]

ROOT = Path(__file__).resolve().parents[1]
TP06 = ROOT / "tests" / "data" / "cardiac" / "ten_tusscher_model_2006_epi.cellml"

JOB = SLAB_JOB


def _read(p: Path) -> dict:
    with h5py.File(p, "r") as f:
        return {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset) and k not in ("point", "electrode", "axis")}


@pytest.mark.parametrize("fibres", ["[1.0, 0.5, 0.2]", "[1.0, 0.0, 0.0]"], ids=["19-point", "7-point"])
def test_two_and_four_ranks_equal_one_rank(tmp_path, fibres):
    """Both stencil paths: oblique fibres (cross terms) and fibres along x (7-point fast path)."""
    shutil.copy(TP06, tmp_path / TP06.name)
    job = tmp_path / "job.toml"
    job.write_text(JOB.replace("direction = [1.0, 0.5, 0.2]", f"direction = {fibres}"))
    env = {"OMP_NUM_THREADS": "1"}
    run_twin("run", job, "-o", tmp_path / "r1", "-q", env=env, check=True)
    ref = _read(tmp_path / "r1" / "RUN.h5")
    assert np.isfinite(ref["activation_time"][ref["mask"] == 1]).all()  # the wave crossed every slab
    for n in (2, 4):
        import os
        import subprocess

        p = subprocess.run(mpi_cmd(n, "run", job, "-o", tmp_path / f"r{n}", "-q"), capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=600)
        assert p.returncode == 0, p.stderr
        got = _read(tmp_path / f"r{n}" / "RUN.h5")
        for k, v in ref.items():
            if k == "ecg":
                np.testing.assert_allclose(got[k], v, rtol=1e-12, atol=1e-12 * np.abs(v).max())
            else:
                assert np.array_equal(got[k], v, equal_nan=True), (n, k)
        with h5py.File(tmp_path / f"r{n}" / "RUN.h5", "r") as f:
            assert int(np.ravel(f.attrs["ranks"])[0]) == n


def test_planning_job_ranks_candidates_the_same_on_one_and_two_ranks(tmp_path):
    """jobs/tissue_planning.toml: candidates spread over 2 ranks give the same table as 1 rank
    (each candidate is a whole single-rank simulation, so bit-identical), and the ranking is the
    physically expected one: pacing at the centre activates the sheet fastest; a wall with an
    isthmus delays activation beyond every pacing site; a complete line of block leaves the far
    half of the sheet (the planes beyond the line: 45-50 %) unactivated and ranks last."""
    import os
    import subprocess

    import xarray as xr

    job = ROOT / "jobs" / "tissue_planning.toml"
    env = {"OMP_NUM_THREADS": "1"}
    run_twin("run", job, "-o", tmp_path / "p1", "-q", env=env, check=True)
    p = subprocess.run(mpi_cmd(2, "run", job, "-o", tmp_path / "p2", "-q"), capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=600)
    assert p.returncode == 0, p.stderr
    a = xr.open_dataset(tmp_path / "p1" / "RUN.h5", engine="h5netcdf").load()
    b = xr.open_dataset(tmp_path / "p2" / "RUN.h5", engine="h5netcdf").load()
    for v in ("rank", "total_activation_time", "activated_fraction", "reentry", "max_activations"):
        assert np.array_equal(a[v].values, b[v].values, equal_nan=True), v
    assert "#1 centre: pacing" in run_twin("summary", tmp_path / "p2", check=True).stdout
    assert run_twin("report", tmp_path / "p2", "-o", tmp_path / "plots", check=True).stdout.strip().endswith(
        "candidates.png")
    order = list(a["candidate"].values)
    assert order[0] == "centre" and order[-1] == "ablation_block", order
    tat = dict(zip(order, a["total_activation_time"].values))
    assert tat["ablation_wall"] > max(tat["corner"], tat["edge_mid"], tat["centre"])
    frac = dict(zip(order, a["activated_fraction"].values))
    assert 0.4 < frac["ablation_block"] < 0.55 and frac["ablation_wall"] == 1.0


def test_cuda_aware_mpi_detection(monkeypatch):
    """Device halo buffers go straight to MPI only where the library says it takes CUDA memory
    (MPIX_Query_cuda_support) or the user says so; the MPICH wheels this project installs from
    PyPI are built without CUDA, so here the answer is no and device slabs are staged through the
    host."""
    from mpi4py import MPI

    from engine.parallel import cuda_aware_mpi

    monkeypatch.setenv("TWIN_CUDA_AWARE_MPI", "1")
    assert cuda_aware_mpi() is True
    monkeypatch.setenv("TWIN_CUDA_AWARE_MPI", "0")
    assert cuda_aware_mpi() is False
    monkeypatch.delenv("TWIN_CUDA_AWARE_MPI")
    if not MPI.Get_library_version().startswith("MPICH"):
        pytest.skip("not the MPICH wheel: its CUDA support is not known here")
    assert cuda_aware_mpi() is False


def _gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy, no driver, or no device
        return False


@pytest.mark.skipif(not _gpu(), reason="no CUDA device")
def test_cuda_two_ranks_equal_one_rank(tmp_path):  # pragma: no cover - needs a GPU
    """The cuda backend over 2 ranks (halo planes staged through the host, or straight to a
    CUDA-aware MPI) gives the one-rank cuda maps and traces bit for bit."""
    import os
    import subprocess

    shutil.copy(TP06, tmp_path / TP06.name)
    job = tmp_path / "job.toml"
    job.write_text(JOB.replace('backend = "cpu"', 'backend = "cuda"'))
    run_twin("run", job, "-o", tmp_path / "r1", "-q", check=True)
    ref = _read(tmp_path / "r1" / "RUN.h5")
    p = subprocess.run(mpi_cmd(2, "run", job, "-o", tmp_path / "r2", "-q"), capture_output=True, text=True,
                       env=dict(os.environ), timeout=600)
    assert p.returncode == 0, p.stderr
    got = _read(tmp_path / "r2" / "RUN.h5")
    for k, v in ref.items():
        if k == "ecg":
            np.testing.assert_allclose(got[k], v, rtol=1e-12, atol=1e-12 * np.abs(v).max())
        else:
            assert np.array_equal(got[k], v, equal_nan=True), k
