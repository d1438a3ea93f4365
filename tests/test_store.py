"""engine.store: shards, journal, resume verification, master file with virtual datasets.

Real HDF5 files and real SIGKILLed subprocesses, no mocks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from engine import store
from engine.errors import StoreError
from engine.layout import Layout, VarSpec, status_attrs

REPO = Path(__file__).resolve().parents[1]
N, CS, T = 250, 64, 5  # 4 chunks, the last one short (58 rows)


def make_layout(n: int = N, chunk_size: int = CS, n_times: int = T) -> Layout:
    return Layout(
        n_patients=n,
        time=np.linspace(0.0, 24.0, n_times),
        time_units="h",
        vars=[
            VarSpec("C", ("patient", "time"), "f8", {"units": "mg/L", "long_name": "plasma concentration"}),
            VarSpec("status", ("patient",), "i1", status_attrs()),
            VarSpec("arm", ("patient",), "i2", {"flag_values": np.array([0, 1], "i2"), "flag_meanings": "placebo drug"}),
            VarSpec("cohort/weight", ("patient",), "f8", {"units": "kg"}),
            VarSpec("cohort/pseudonym", ("patient",), "S64", {"long_name": "keyed hash"}),
            VarSpec("biomarkers/cmax", ("patient",), "f8", {"units": "mg/L"}),
        ],
        chunk_size=chunk_size,
    )


def make_arrays(layout: Layout, c: int) -> dict[str, np.ndarray]:
    """Deterministic data of chunk c (same bytes whoever writes it, in whatever order)."""
    lo, hi = layout.chunk_bounds(c)
    n, t = hi - lo, len(layout.time)
    rng = np.random.default_rng(1000 + c)
    status = np.zeros(n, "i1")
    status[:: 17] = 1
    return {
        "C": rng.random((n, t)),
        "status": status,
        "arm": (np.arange(lo, hi) % 2).astype("i2"),
        "cohort/weight": 50 + 50 * rng.random(n),
        "cohort/pseudonym": np.array([f"{i:064x}".encode() for i in range(lo, hi)], "S64"),
        "biomarkers/cmax": rng.random(n),
    }


def manifest(layout: Layout, job: str = "a" * 64) -> dict:
    return {"job_sha256": job, "cohort_fingerprint": "f" * 64, "layout": store.layout_manifest(layout)}


def expected(layout: Layout) -> dict[str, np.ndarray]:
    parts = [make_arrays(layout, c) for c in range(layout.n_chunks())]
    return {v.path: np.concatenate([p[v.path] for p in parts]) for v in layout.vars}


def write_all(run_dir: Path, layout: Layout, chunks=None, rank: int = 0) -> dict[int, dict]:
    attempt = store.init_run_dir(run_dir, manifest(layout))
    out = {}
    with store.ShardWriter(run_dir, attempt, rank, layout) as w:
        for c in chunks if chunks is not None else range(layout.n_chunks()):
            out[c] = w.write_chunk(c, make_arrays(layout, c))
    return out


def master_arrays(path: Path, layout: Layout) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {v.path: f[v.path][()] for v in layout.vars}


# ------------------------------------------------------------------------------ basic write/read
def test_write_journal_and_done_chunks(tmp_path):
    lay = make_layout()
    run = tmp_path / "run"
    entries = write_all(run, lay)
    assert sorted(entries) == [0, 1, 2, 3]
    e = entries[3]
    assert (e["start"], e["stop"]) == (192, 250)
    assert e["shard"] == "shards/a001-r0000.h5"
    assert e["n_failed"] == int(np.count_nonzero(make_arrays(lay, 3)["status"]))
    assert e["sha256"] == store.chunk_sha256(lay, make_arrays(lay, 3))
    lines = (run / "journal" / "a001-r0000.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [entries[c] for c in range(4)]
    assert store.done_chunks(run, lay) == entries
    with h5py.File(run / e["shard"], "r") as f:
        assert f.libver[0] == "earliest"  # not libver='latest': opens after a kill -9
        got = store.read_chunk(f, lay, 2)
    for k, v in make_arrays(lay, 2).items():
        np.testing.assert_array_equal(got[k], v)


def test_write_chunk_validates(tmp_path):
    lay = make_layout()
    a = store.init_run_dir(tmp_path, manifest(lay))
    with store.ShardWriter(tmp_path, a, 0, lay) as w:
        good = make_arrays(lay, 0)
        for bad, msg in [
            ({k: v for k, v in good.items() if k != "arm"}, "missing"),
            ({**good, "extra": good["arm"]}, "unexpected"),
            ({**good, "C": good["C"][:, :4]}, "shape"),
            ({**good, "status": good["status"].astype("i2")}, "dtype"),
            ({**good, "cohort/pseudonym": good["cohort/pseudonym"].astype("S32")}, "dtype"),
        ]:
            with pytest.raises(ValueError, match=msg):
                w.write_chunk(0, bad)
        with pytest.raises(ValueError, match="out of range"):
            w.write_chunk(4, good)
        with pytest.raises(ValueError, match="shape"):
            w.write_chunk(3, good)  # chunk 3 is short
        w.write_chunk(0, good)
        with pytest.raises(ValueError, match="already"):
            w.write_chunk(0, good)
    assert list(store.done_chunks(tmp_path, lay)) == [0]


def test_init_run_dir_attempts_and_manifest_mismatch(tmp_path):
    lay = make_layout()
    assert [store.init_run_dir(tmp_path, manifest(lay)) for _ in range(3)] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path / "attempts")) == ["001", "002", "003"]
    assert json.loads((tmp_path / "run.json").read_text()) == store.normalize_json(manifest(lay))

    with pytest.raises(StoreError) as ei:
        store.init_run_dir(tmp_path, manifest(lay, job="b" * 64))
    msg = str(ei.value)
    assert "\n" not in msg and "job_sha256" in msg and "new run directory" in msg

    with pytest.raises(StoreError, match=r"layout \(.*n_patients"):
        store.init_run_dir(tmp_path, manifest(make_layout(n=251)))
    with pytest.raises(StoreError, match="cohort_fingerprint"):
        store.init_run_dir(tmp_path, {**manifest(lay), "cohort_fingerprint": "0" * 64})
    # a refused start allocates no attempt
    assert store.init_run_dir(tmp_path, manifest(lay)) == 4

    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable"):
        store.init_run_dir(tmp_path, manifest(lay))


# ------------------------------------------------------------------------------ master file
def test_master_opens_in_xarray_from_anywhere(tmp_path, monkeypatch):
    import dask.array as da
    import xarray as xr

    monkeypatch.delenv("HDF5_VDS_PREFIX", raising=False)
    lay = make_layout()
    run = tmp_path / "run"
    entries = write_all(run, lay)
    attrs = {"job_toml": "[job]\nname='x'\n", "ranks": 1, "seed": 7, "meta": {"a": [1, 2]}}
    path = store.build_master(run, lay, entries, attrs)
    assert path == run / "RUN.h5" and not (run / "RUN.h5.tmp").exists()
    want = expected(lay)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert ds["C"].dims == ("patient", "time")
        assert ds["status"].dims == ("patient",) and ds["arm"].dims == ("patient",)
        np.testing.assert_array_equal(ds["patient"].values, np.arange(N))
        np.testing.assert_array_equal(ds["time"].values, lay.time)
        assert ds["time"].attrs["units"] == "h"
        assert ds["C"].attrs["units"] == "mg/L"
        np.testing.assert_array_equal(ds["C"].values, want["C"])
        # status: int8 with CF flags, no masking or float promotion
        assert ds["status"].dtype == np.int8
        np.testing.assert_array_equal(ds["status"].values, want["status"])
        np.testing.assert_array_equal(ds["status"].attrs["flag_values"], status_attrs()["flag_values"])
        assert ds["status"].attrs["flag_meanings"] == status_attrs()["flag_meanings"]
        assert ds["arm"].dtype == np.int16
        assert ds.attrs["seed"] == 7 and json.loads(ds.attrs["meta"]) == {"a": [1, 2]}
        assert ds.attrs["job_toml"] == attrs["job_toml"]
    with xr.open_dataset(path, engine="h5netcdf", group="cohort") as ds:
        assert ds["weight"].dims == ("patient",) and ds["weight"].attrs["units"] == "kg"
        np.testing.assert_array_equal(ds["weight"].values, want["cohort/weight"])
        np.testing.assert_array_equal(ds["pseudonym"].values, want["cohort/pseudonym"])
    with xr.open_dataset(path, engine="h5netcdf", group="biomarkers") as ds:
        np.testing.assert_array_equal(ds["cmax"].values, want["biomarkers/cmax"])

    with h5py.File(path, "r") as f:
        for v in lay.vars:
            assert f[v.path].is_virtual
            assert {m.file_name for m in f[v.path].virtual_sources()} == {"shards/a001-r0000.h5"}
        x = da.from_array(f["C"], chunks=(CS, T))
        assert x.npartitions == 4
        np.testing.assert_array_equal(x.compute(), want["C"])
        assert float(x[:, 1].sum().compute()) == pytest.approx(want["C"][:, 1].sum())


def test_master_survives_moving_the_run_dir(tmp_path, monkeypatch):
    import xarray as xr  # imported here: the SIGKILL child imports this module

    monkeypatch.delenv("HDF5_VDS_PREFIX", raising=False)
    lay = make_layout()
    run = tmp_path / "run"
    store.build_master(run, lay, write_all(run, lay), {})
    moved = tmp_path / "a" / "b" / "moved"
    moved.parent.mkdir(parents=True)
    shutil.move(run, moved)
    # a decoy shard relative to the cwd must not be picked up: the master's directory wins
    decoy = tmp_path / "cwd"
    (decoy / "shards").mkdir(parents=True)
    with h5py.File(decoy / "shards" / "a001-r0000.h5", "w") as f:
        for c in range(lay.n_chunks()):
            for k, v in make_arrays(lay, c).items():
                f[f"chunk_{c:06d}/{k}"] = np.zeros_like(v)
    monkeypatch.chdir(decoy)
    with xr.open_dataset(moved / "RUN.h5", engine="h5netcdf") as ds:
        np.testing.assert_array_equal(ds["C"].values, expected(lay)["C"])
    # with a relative path to the master, too
    monkeypatch.chdir(moved.parent)
    with xr.open_dataset("moved/RUN.h5", engine="h5netcdf", group="cohort") as ds:
        np.testing.assert_array_equal(ds["weight"].values, expected(lay)["cohort/weight"])


def test_master_independent_of_ranks_attempts_and_order(tmp_path):
    lay = make_layout(n=500, chunk_size=40)  # 13 chunks
    ref = tmp_path / "ref"
    store.build_master(ref, lay, write_all(ref, lay), {})

    run = tmp_path / "run"
    order = list(np.random.default_rng(3).permutation(lay.n_chunks()))
    first, second = order[:6], order[6:]
    a1 = store.init_run_dir(run, manifest(lay))
    ws = [store.ShardWriter(run, a1, r, lay) for r in range(3)]
    for i, c in enumerate(first):
        ws[i % 3].write_chunk(int(c), make_arrays(lay, int(c)))
    for w in ws:
        w.close()
    a2 = store.init_run_dir(run, manifest(lay))
    with store.ShardWriter(run, a2, 0, lay) as w0, store.ShardWriter(run, a2, 1, lay) as w1:
        for i, c in enumerate(second):
            (w0, w1)[i % 2].write_chunk(int(c), make_arrays(lay, int(c)))
        w1.write_chunk(int(first[0]), make_arrays(lay, int(first[0])))  # done twice: first one wins
    done = store.done_chunks(run, lay)
    assert sorted(done) == list(range(lay.n_chunks()))
    assert done[int(first[0])]["shard"].startswith("shards/a001-")
    store.build_master(run, lay, done, {})
    a, b = master_arrays(ref / "RUN.h5", lay), master_arrays(run / "RUN.h5", lay)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with h5py.File(run / "RUN.h5", "r") as f:
        assert len({m.file_name for m in f["C"].virtual_sources()}) == 5


def test_build_master_refuses_missing_chunks(tmp_path):
    lay = make_layout()
    entries = write_all(tmp_path, lay, chunks=[0, 2])
    with pytest.raises(StoreError, match=r"2 of 4 chunks missing \(1, 3\)"):
        store.build_master(tmp_path, lay, entries, {})
    assert not (tmp_path / "RUN.h5").exists()


def test_master_attrs_larger_than_64k(tmp_path):
    import xarray as xr  # imported here: the SIGKILL child imports this module

    lay = make_layout()
    big = "# " + "x" * 200_000 + "\n"
    path = store.build_master(tmp_path, lay, write_all(tmp_path, lay), {"job_toml": big})
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert ds.attrs["job_toml"] == big


# ------------------------------------------------------------------------------ crash safety
CHILD = textwrap.dedent(
    """
    import importlib.util, os, signal, sys
    spec = importlib.util.spec_from_file_location("tstore", sys.argv[1])
    t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)
    from engine import store
    run, attempt, k, mode = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    lay = t.make_layout()
    if mode == "uncommitted_group":  # group commit: only an explicit commit makes chunks durable
        w = store.ShardWriter(run, attempt, 0, lay, commit_bytes=10**12, commit_seconds=3600)
    else:                            # commit every chunk, so the kill lands between known steps
        w = store.ShardWriter(run, attempt, 0, lay, commit_bytes=0)
    for c in range(k):
        w.write_chunk(c, t.make_arrays(lay, c))
    w.commit()
    arrays = t.make_arrays(lay, k)
    if mode == "uncommitted_group":  # written and flushed to the file, not yet committed
        w.write_chunk(k, arrays)
        w._sync()
    elif mode == "mid_data":          # killed while creating the chunk's datasets
        g = w._h5.create_group(store.chunk_group(k))
        g.create_dataset("C", data=arrays["C"])
        g.create_dataset("status", shape=arrays["status"].shape, dtype="i1")
    elif mode == "before_journal":  # data written and fsync'ed, journal line not yet appended
        w._write_data(k, arrays)
        w._sync()
    elif mode == "torn_journal":    # killed half-way through the journal line
        w._write_data(k, arrays)
        w._sync()
        line = b'{"chunk":%d,"start":%d,"stop":%d,"shard":"' % ((k,) + lay.chunk_bounds(k))
        os.write(w._jfd, line)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def run_killed_writer(run: Path, attempt: int, k: int, mode: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, "-c", CHILD, __file__, str(run), str(attempt), str(k), mode],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr


@pytest.mark.parametrize("mode", ["between_chunks", "mid_data", "before_journal", "torn_journal",
                                  "uncommitted_group"])
def test_kill_9_then_resume(tmp_path, mode, caplog):
    lay = make_layout()
    run = tmp_path / "run"
    a1 = store.init_run_dir(run, manifest(lay))
    run_killed_writer(run, a1, 2, mode)
    with h5py.File(run / "shards" / "a001-r0000.h5", "r", locking=False) as f:  # still opens
        assert "chunk_000000" in f
    done = store.done_chunks(run, lay)
    assert sorted(done) == [0, 1]
    for c in (0, 1):
        assert done[c]["sha256"] == store.chunk_sha256(lay, make_arrays(lay, c))
    if mode == "torn_journal":
        assert "torn" in caplog.text

    # resume: a new attempt writes the rest into new files; the result equals an uninterrupted run
    a2 = store.init_run_dir(run, manifest(lay))
    assert a2 == 2
    with store.ShardWriter(run, a2, 0, lay) as w:
        for c in range(lay.n_chunks()):
            if c not in done:
                done[c] = w.write_chunk(c, make_arrays(lay, c))
    assert store.done_chunks(run, lay) == done
    got = master_arrays(store.build_master(run, lay, done, {}), lay)
    for k, v in expected(lay).items():
        np.testing.assert_array_equal(got[k], v)


def _two_rank_run(run: Path, lay: Layout) -> dict[int, dict]:
    a = store.init_run_dir(run, manifest(lay))
    out = {}
    with store.ShardWriter(run, a, 0, lay) as w0, store.ShardWriter(run, a, 1, lay) as w1:
        for c in range(lay.n_chunks()):
            out[c] = (w0, w1)[c % 2].write_chunk(c, make_arrays(lay, c))
    return out


def test_garbage_or_truncated_shard_drops_its_chunks(tmp_path, caplog):
    lay = make_layout()
    run = tmp_path / "run"
    entries = _two_rank_run(run, lay)
    assert sorted(store.done_chunks(run, lay)) == [0, 1, 2, 3]
    shard1 = run / "shards" / "a001-r0001.h5"
    size = shard1.stat().st_size

    shard1.write_bytes(np.random.default_rng(0).bytes(size))  # garbage over the whole file
    assert sorted(store.done_chunks(run, lay)) == [0, 2]
    assert "cannot be opened" in caplog.text

    shutil.copy(run / "shards" / "a001-r0000.h5", shard1)  # a valid HDF5 file, wrong content
    assert sorted(store.done_chunks(run, lay)) == [0, 2]

    with open(run / "shards" / "a001-r0000.h5", "r+b") as fh:
        fh.truncate(size // 2)
    assert sorted(store.done_chunks(run, lay)) == []

    shard1.unlink()
    assert store.done_chunks(run, lay) == {}
    assert entries  # the journal still lists them, but nothing is trusted


def test_flipped_byte_drops_only_that_chunk(tmp_path):
    lay = make_layout()
    run = tmp_path / "run"
    write_all(run, lay)
    shard = run / "shards" / "a001-r0000.h5"
    with h5py.File(shard, "r") as f:
        off = f["chunk_000002/biomarkers/cmax"].id.get_offset()
    with open(shard, "r+b") as fh:
        fh.seek(off + 3)
        b = fh.read(1)
        fh.seek(off + 3)
        fh.write(bytes([b[0] ^ 0x40]))
    assert sorted(store.done_chunks(run, lay)) == [0, 1, 3]


def test_garbled_journal_lines_are_ignored(tmp_path):
    lay = make_layout()
    entries = write_all(tmp_path, lay, chunks=[0, 1])
    j = tmp_path / "journal" / "a001-r0000.jsonl"
    with open(j, "ab") as fh:
        fh.write(b'{"chunk": 3, "start": 0}\n\x00\x00garbage\n{"chunk":2,')
    assert store.done_chunks(tmp_path, lay) == entries


# ------------------------------------------------------------------------------ bandwidth
def test_write_bandwidth(tmp_path):
    """1000 x 169 float64, two variables per chunk, with the fsyncs: print MB/s."""
    lay = Layout(
        n_patients=20_000, time=np.arange(169.0), time_units="h", chunk_size=1000,
        vars=[VarSpec("C", ("patient", "time"), "f8"), VarSpec("E", ("patient", "time"), "f8")],
    )
    a = store.init_run_dir(tmp_path, {"layout": store.layout_manifest(lay)})
    rng = np.random.default_rng(0)
    chunks = [{"C": rng.random((1000, 169)), "E": rng.random((1000, 169))} for _ in range(4)]
    n = 12
    with store.ShardWriter(tmp_path, a, 0, lay) as w:
        t0 = time.perf_counter()
        for c in range(n):
            w.write_chunk(c, chunks[c % 4])
        dt = time.perf_counter() - t0
    mb = n * 2 * 1000 * 169 * 8 / 1e6
    print(f"\nwrite_chunk: {mb / dt:.0f} MB/s ({dt / n * 1e3:.1f} ms per 2.7 MB chunk, incl. sha256 + fsync)")
    assert mb / dt > 5


def test_run_lock(tmp_path):
    with store.RunLock(tmp_path):
        # another process (flock is per open file description, so a child process shows it best)
        r = subprocess.run(
            [sys.executable, "-c", "import sys; from engine import store; store.RunLock(sys.argv[1]).acquire()",
             str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode != 0 and "is in use by twin run pid" in r.stderr
    with store.RunLock(tmp_path):  # released: can be taken again
        pass


def test_group_commit_journals_only_durable_chunks(tmp_path):
    """Chunks written inside a group are journaled together at commit; a slow chunk commits at once."""
    lay = make_layout()
    a = store.init_run_dir(tmp_path, manifest(lay))
    w = store.ShardWriter(tmp_path, a, 0, lay, commit_bytes=10**12, commit_seconds=3600)
    w.write_chunk(0, make_arrays(lay, 0))
    w.write_chunk(1, make_arrays(lay, 1))
    assert store.done_chunks(tmp_path, lay) == {}  # written, not committed: resume would redo them
    w.commit()
    assert sorted(store.done_chunks(tmp_path, lay)) == [0, 1]
    w.commit_seconds = 0.0  # every write is "late": its commit starts at once (fsync in the background)
    w.write_chunk(2, make_arrays(lay, 2))
    w._await_commit()
    assert sorted(store.done_chunks(tmp_path, lay)) == [0, 1, 2]
    w.commit_seconds, w.commit_bytes = 3600, 1  # one chunk exceeds the byte budget
    w.write_chunk(3, make_arrays(lay, 3))
    w._await_commit()
    done = store.done_chunks(tmp_path, lay)
    w.close()
    assert sorted(done) == [0, 1, 2, 3]
    for c in range(4):
        assert done[c]["sha256"] == store.chunk_sha256(lay, make_arrays(lay, c))
