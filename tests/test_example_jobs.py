"""The README's example job runs end to end and its result opens in xarray and Dask."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import pytest
import xarray as xr

from engine.analysis import open_run
from tests.helpers import run_twin

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.toml"))


@pytest.mark.parametrize("job", JOBS, ids=[j.stem for j in JOBS])
def test_every_example_job_validates(job):
    p = run_twin("validate", job)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"{job}: ok")


@pytest.mark.slow
def test_pk_example_end_to_end(tmp_path):
    job = Path(__file__).resolve().parents[1] / "jobs" / "pk_example.toml"
    out = tmp_path / "pk_example"
    p = run_twin("run", job, "-o", out, "--quiet", check=True)
    assert "10000 patients, 0 failed" in p.stderr
    ds = xr.open_dataset(out / "RUN.h5", engine="h5netcdf")
    assert dict(ds.sizes) == {"patient": 10000, "time": 169}
    assert ds["C"].attrs["units"] == "mg/L" and ds["time"].attrs["units"] == "h"
    from engine.backend import resolve

    assert ds.attrs["backend"] == resolve("auto").name and ds.attrs["job_name"] == "pk_example"
    C = ds["C"].values
    assert np.isfinite(C).all() and (C[:, 0] == 0).all() and (C[:, 1:] > 0).all()
    # dose-proportional linear PK: the 200 mg arm's median AUC is twice the 100 mg arm's, within
    # sampling noise of two ~5000-patient medians (checked loosely: 1.8–2.2)
    run = open_run(out)
    auc = run["auc_0_168"].values
    arm = run["arm"].values
    ratio = np.median(auc[arm == 1]) / np.median(auc[arm == 0])
    assert 1.8 < ratio < 2.2
    with h5py.File(out / "RUN.h5", "r") as f:
        lazy = da.from_array(f["C"], chunks=(1000, 169))
        np.testing.assert_array_equal(lazy[:, 24].compute(), C[:, 24])
    assert run_twin("audit", out).returncode == 0
    assert run_twin("summary", out / "RUN.h5").returncode == 0
