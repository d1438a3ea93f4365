"""engine.analysis: open_run, summary_table/summary, report.

The RUN.h5 files are written by hand with h5py following engine/layout.py (dimension scales on the
root, attached to the datasets of the root and of the groups), one with plain datasets and one with
virtual datasets over two shard files like the real master. Expected numbers come from h5py +
numpy, never from the code under test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dask
import h5py
import numpy as np
import pytest

from engine import analysis
from engine.errors import StoreError
from engine.layout import STATUS_CODES, status_attrs

N, T = 400, 25
ARMS = ["placebo", "drug"]
FAILED = {1: [3, 50, 51, 222], 4: [7, 120, 333]}  # status code -> patients (NaN outputs/biomarkers)
PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _data(n: int = N, t: int = T, seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    time = np.linspace(0.0, 48.0, t)
    arm = (np.arange(n) % 2).astype("i2")
    cl = rng.lognormal(np.log(5.0), 0.3, n) * np.where(arm == 1, 0.7, 1.0)
    v = rng.lognormal(np.log(40.0), 0.2, n)
    ka = 1.2
    dose = 100.0
    k = cl / v
    C = dose * ka / (v * (ka - k))[:, None] * (np.exp(-k[:, None] * time) - np.exp(-ka * time))
    C = C * (1 + 0.02 * rng.standard_normal((n, t)))
    E = 100 * C / (C + 0.8)
    status = np.zeros(n, "i1")
    for code, rows in FAILED.items():
        status[[r for r in rows if r < n]] = code
    bad = status != 0
    C[bad] = np.nan
    E[bad] = np.nan
    cmax = C.max(axis=1)  # NaN for failed rows
    auc = np.sum((C[:, 1:] + C[:, :-1]) * 0.5 * np.diff(time), axis=1)
    return {
        "time": time, "C": C, "E": E, "status": status, "arm": arm,
        "cohort/weight": rng.normal(75, 12, n), "cohort/sex": rng.integers(0, 2, n).astype("i2"),
        "cohort/CL": cl, "cohort/V": v, "cohort/E": rng.random(n),  # cohort/E clashes with root E
        "cohort/pseudonym": np.array([f"p{i:05d}".encode() for i in range(n)], dtype="S64"),
        "biomarkers/cmax": cmax, "biomarkers/auc": auc, "biomarkers/weight": np.full(n, 1.0),  # clash
    }


ATTRS = {
    "C": {"units": "mg/L", "long_name": "plasma concentration"},
    "E": {"units": "%", "long_name": "effect"},
    "status": status_attrs(),
    "arm": {"flag_values": np.array([0, 1], "i2"), "flag_meanings": " ".join(ARMS), "long_name": "treatment arm"},
    "cohort/weight": {"units": "kg", "kind": "covariate"},
    "cohort/sex": {"flag_values": np.array([0, 1], "i2"), "flag_meanings": "F M", "kind": "covariate"},
    "cohort/CL": {"units": "L/h", "kind": "parameter"},
    "cohort/V": {"units": "L", "kind": "parameter"},
    "cohort/E": {"units": "1", "kind": "covariate"},
    "cohort/pseudonym": {"long_name": "keyed hash"},
    "biomarkers/cmax": {"units": "mg/L", "long_name": "max of C"},
    "biomarkers/auc": {"units": "mg/L*h", "long_name": "auc of C"},
    "biomarkers/weight": {"units": "1"},
}
ROOT_ATTRS = {
    "job_name": "analysis-test", "model": "pk1c_emax", "backend": "numpy", "device": "cpu", "ranks": 4,
    "n_patients": N, "n_failed": sum(len(v) for v in FAILED.values()), "n_excluded_no_consent": 3,
    "seed": 42, "start_time": "2026-01-01T00:00:00Z", "end_time": "2026-01-01T00:01:00Z",
    "twin_layout": '{"n_patients": 400, "chunk_size": 50, "n_times": 25, "vars": []}',
}


def _write_master(path: Path, d: dict, vds_chunk: int | None = None) -> None:
    """RUN.h5 as engine/layout.py describes it; with vds_chunk, every per-patient dataset is a
    virtual dataset over two shard files next to it (rows split at vds_chunk)."""
    n, t = d["C"].shape
    shards = []
    if vds_chunk:
        (path.parent / "shards").mkdir(exist_ok=True)
        for i, (lo, hi) in enumerate([(0, vds_chunk), (vds_chunk, n)]):
            rel = f"shards/a001-r{i:04d}.h5"
            with h5py.File(path.parent / rel, "w") as s:
                for k, a in d.items():
                    if k != "time":
                        s.create_dataset(f"chunk_{i:06d}/{k}", data=a[lo:hi])
            shards.append((lo, hi, rel, i))
    with h5py.File(path, "w", libver=("v110", "latest")) as f:
        p = f.create_dataset("patient", data=np.arange(n, dtype="i8"))
        p.attrs["long_name"] = "global patient index"
        p.make_scale("patient")
        tm = f.create_dataset("time", data=d["time"])
        tm.attrs["units"] = "h"
        tm.attrs["long_name"] = "sample time"
        tm.make_scale("time")
        for k, a in d.items():
            if k == "time":
                continue
            if vds_chunk:
                lay = h5py.VirtualLayout(shape=a.shape, dtype=a.dtype)
                for lo, hi, rel, i in shards:
                    lay[lo:hi] = h5py.VirtualSource(rel, f"chunk_{i:06d}/{k}", shape=(hi - lo,) + a.shape[1:])
                ds = f.create_virtual_dataset(k, lay, fillvalue=np.nan if a.dtype.kind == "f" else None)
            else:
                ds = f.create_dataset(k, data=a)
            for ak, av in ATTRS.get(k, {}).items():
                ds.attrs[ak] = av
            ds.dims[0].attach_scale(p)
            if a.ndim == 2:
                ds.dims[1].attach_scale(tm)
        for ak, av in ROOT_ATTRS.items():
            f.attrs[ak] = av


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("run")
    _write_master(d / "RUN.h5", data)
    return d


# ------------------------------------------------------------------------------------ open_run
def test_open_run_is_lazy_with_coords_units_and_merged_groups(run_dir):
    ds = analysis.open_run(run_dir, chunks=64)
    try:
        assert ds.sizes == {"patient": N, "time": T}
        assert list(ds["patient"].values) == list(range(N))
        assert ds["time"].attrs["units"] == "h"
        np.testing.assert_allclose(ds["time"].values, np.linspace(0, 48, T))
        for name in ("C", "E", "status", "arm", "weight", "sex", "CL", "V", "cohort_E", "pseudonym",
                     "cmax", "auc", "bm_weight"):
            assert ds[name].chunks is not None, name  # Dask-backed
            assert ds[name].chunks[0] == (64,) * 6 + (16,), name
            assert ds[name].dims[0] == "patient"
        assert ds["C"].dims == ("patient", "time")
        assert ds["C"].attrs["units"] == "mg/L" and ds["cmax"].attrs["units"] == "mg/L"
        assert ds["weight"].attrs["units"] == "kg" and ds["CL"].attrs["kind"] == "parameter"
        # names: kept unless taken; the h5 path is always recorded
        assert ds["E"].attrs["h5_path"] == "E" and ds["cohort_E"].attrs["h5_path"] == "cohort/E"
        assert ds["weight"].attrs["h5_path"] == "cohort/weight"
        assert ds["bm_weight"].attrs["h5_path"] == "biomarkers/weight"
        assert analysis.flags(ds["sex"]) == {0: "F", 1: "M"}
        assert analysis.flags(ds["status"])[4] == "invalid_parameter"
        assert ds["sex"].dtype == np.int16 and ds["status"].dtype == np.int8  # no mask-to-float
        assert ds.attrs["job_name"] == "analysis-test" and int(ds.attrs["ranks"]) == 4
        assert analysis.output_names(ds) == ["C", "E"]
        assert sorted(analysis.biomarker_names(ds)) == ["auc", "bm_weight", "cmax"]
        assert ds["pseudonym"].values[5] == b"p00005"
    finally:
        ds.close()


def test_open_run_default_chunks_follow_store_chunks(run_dir):
    ds = analysis.open_run(run_dir / "RUN.h5")
    try:
        assert ds["C"].chunks[0] == (N,)  # small run: one block of whole store chunks
        assert ds["status"].chunks is not None
        # the file may be opened again while a Dataset still holds it
        assert "placebo" in analysis.summary(run_dir)
        ds2 = analysis.open_run(run_dir)
        np.testing.assert_array_equal(ds2["C"].values, ds["C"].values)
        ds2.close()
    finally:
        ds.close()


def test_missing_or_corrupt_file_is_store_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist") as e:
        analysis.open_run(tmp_path / "nowhere")
    assert "\n" not in str(e.value) and "nowhere" in str(e.value)
    with pytest.raises(StoreError, match="RUN.h5"):
        analysis.summary(tmp_path)  # a directory without RUN.h5
    bad = tmp_path / "RUN.h5"
    bad.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(StoreError, match="not a readable HDF5 file") as e:
        analysis.open_run(tmp_path)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    with h5py.File(bad, "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not a twin run result"):
        analysis.report(bad, tmp_path / "out")


def test_virtual_datasets_read_and_missing_shard_is_store_error(tmp_path, data):
    _write_master(tmp_path / "RUN.h5", data, vds_chunk=150)
    ds = analysis.open_run(tmp_path, chunks=100)
    try:
        np.testing.assert_array_equal(ds["C"].values, data["C"])
        np.testing.assert_array_equal(ds["sex"].values, data["cohort/sex"])
        a, b = analysis.summary_table(tmp_path), analysis.summary_table(tmp_path, chunks=32)
        # percentiles and counts do not depend on the Dask blocks; means only up to summation order
        cols = ["arm", "kind", "variable", "units", "when", "time", "n", "p5", "p50", "p95"]
        assert a[cols].equals(b[cols])
        np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-12)
    finally:
        ds.close()
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.move(tmp_path, moved)  # relative shard paths: still readable after a move
    assert analysis.summary_table(moved).equals(analysis.summary_table(moved))
    (moved / "shards" / "a001-r0001.h5").unlink()
    with pytest.raises(StoreError, match="a001-r0001.h5.*missing"):
        analysis.open_run(moved)


# ------------------------------------------------------------------------------------ summary
def _expected(path: Path):
    """arm -> {var: (ok values)} straight from h5py (failed rows dropped by status)."""
    with h5py.File(path, "r") as f:
        arm, status = f["arm"][()], f["status"][()]
        v = {k: f[k][()] for k in ("C", "E", "biomarkers/cmax", "biomarkers/auc")}
        time = f["time"][()]
    groups = {name: arm == i for i, name in enumerate(ARMS)} | {analysis.ALL_ARMS: np.ones_like(arm, bool)}
    return groups, status, v, time


def test_summary_table_matches_numpy(run_dir):
    calls = []

    def counting_get(dsk, keys, **kw):
        calls.append(keys)
        return dask.get(dsk, keys, **kw)

    with dask.config.set(scheduler=counting_get):
        df = analysis.summary_table(run_dir, chunks=64)  # 7 patient blocks: exact across blocks?
    assert len(calls) == 1  # everything in ONE dask.compute
    groups, status, v, time = _expected(run_dir / "RUN.h5")
    assert list(dict.fromkeys(df.arm)) == ARMS + [analysis.ALL_ARMS]
    names = {c: k for k, c in STATUS_CODES.items()}
    for arm, sel in groups.items():
        sub = df[df.arm == arm]
        cnt = dict(zip(sub[sub.kind == "count"].variable, sub[sub.kind == "count"].n))
        assert cnt["patients"] == sel.sum()
        assert cnt["failed"] == (sel & (status != 0)).sum() and cnt["ok"] == (sel & (status == 0)).sum()
        for code in (1, 4):
            assert cnt[f"failed:{names[code]}"] == (sel & (status == code)).sum() > 0
        assert cnt["failed:max_steps"] == 0
        ok = sel & (status == 0)
        for b in ("cmax", "auc"):
            x = v[f"biomarkers/{b}"][ok]
            r = sub[(sub.kind == "biomarker") & (sub.variable == b)].iloc[0]
            assert r.n == ok.sum() and r.units == ("mg/L" if b == "cmax" else "mg/L*h")
            np.testing.assert_allclose(r[["mean", "p5", "p50", "p95"]].to_numpy(float),
                                       [x.mean(), *np.nanpercentile(x, [5, 50, 95])], rtol=1e-12)
            # exact order statistics, not an approximation: the same as numpy bit for bit
            assert [r.p5, r.p50, r.p95] == list(np.nanpercentile(v[f"biomarkers/{b}"][sel], [5, 50, 95]))
        for o in ("C", "E"):
            x = v[o][ok]
            mean = x.mean(axis=0)
            rows = sub[(sub.kind == "output") & (sub.variable == o)]
            want_t = sorted({T - 1, int(np.argmax(mean))})
            assert list(rows.time) == [time[i] for i in want_t]
            assert int(np.argmax(mean)) != T - 1  # the test data has an interior peak
            for r, i in zip(rows.itertuples(), want_t):
                assert r.n == ok.sum()
                np.testing.assert_allclose([r.mean, r.p5, r.p50, r.p95],
                                           [mean[i], *np.nanpercentile(v[o][sel, i], [5, 50, 95])], rtol=1e-12)
            assert set(rows.when) == {"last", "max mean"}


def test_summary_text(run_dir):
    text = analysis.summary(run_dir)
    df = analysis.summary_table(run_dir)
    for s in ("analysis-test", "pk1c_emax", "numpy", "ranks 4", "excluded without consent 3", "placebo",
              "drug", "nonfinite", "invalid_parameter", "cmax [mg/L]", "C [mg/L]", "time [h]", "max mean"):
        assert s in text, s
    r = df[(df.arm == "drug") & (df.variable == "cmax")].iloc[0]
    line = next(ln for ln in text.splitlines() if ln.split()[:2] == ["drug", "cmax"])
    assert [f"{r[k]:.4g}" for k in ("mean", "p5", "p50", "p95")] == line.split()[-4:]


# ------------------------------------------------------------------------------------ report
def test_report_writes_pngs(run_dir, tmp_path):
    out = tmp_path / "fig" / "sub"
    paths = analysis.report(run_dir, out, chunks=48)
    names = sorted(p.name for p in paths)
    assert names == sorted(["C_bands.png", "E_bands.png", "bm_cmax_hist.png", "bm_auc_hist.png",
                            "bm_bm_weight_hist.png", "status.png"])
    for p in paths:
        assert p.parent == out
        b = p.read_bytes()
        assert b[:8] == PNG_SIG and len(b) > 5000, p


def test_report_without_failures_has_no_status_chart(tmp_path):
    d = _data(n=60, t=6, seed=3)
    d["status"][:] = 0
    d["C"] = np.nan_to_num(d["C"], nan=1.0)
    _write_master(tmp_path / "RUN.h5", d)
    names = {p.name for p in analysis.report(tmp_path, tmp_path / "fig")}
    assert "status.png" not in names and "C_bands.png" in names
