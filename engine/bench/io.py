"""HDF5 write bandwidth: `ShardWriter.write_chunk` vs a raw dd-style write of the same bytes.

Chunks have the benchmark job's real layout (C and E patient × 169 float64, status, arm, cohort
covariates and parameters, biomarkers), filled with random numbers. In the same directory, with
the same total bytes (the arrays' payload), interleaved repetitions, median reported:

  engine      ShardWriter.write_chunk per chunk: validate, SHA-256 of the arrays, HDF5 datasets,
              flush + fsync of the shard, journal line + fsync (2 fsyncs per chunk)
  raw_dd      os.write of each chunk's bytes, one fsync at the end   (dd bs=CHUNK conv=fsync)
  raw_sync    os.write + fsync per chunk                              (dd bs=CHUNK oflag=dsync)
  proposed    proposed engine change A: the engine's steps with the SHA-256 computed in a second
              thread while the HDF5 write and its fsync run (hashlib releases the GIL)
  group       proposed change B: A + group commit (one shard fsync + journal fsync per 64 MB) +
              datasets written with h5py's low-level API
  sha256      hashing the same arrays in memory, no IO (what the engine pays that dd does not)

MB/s = payload bytes / wall time, 1 MB = 1e6 bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .. import store
from ..layout import Layout


def bench_layout(job_path: Path, chunk: int) -> Layout:
    from dataclasses import replace

    from ..config import load_job
    from ..runner import make_plan

    lay = make_plan(load_job(job_path)).layout
    return replace(lay, chunk_size=chunk)


def synth_chunks(layout: Layout, rows: int, k: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    T = len(layout.time)
    out = []
    for _ in range(k):
        arrays = {}
        for v in layout.vars:
            shape = v.shape(rows, T)
            dt = np.dtype(v.dtype)
            if dt.kind == "f":
                arrays[v.path] = rng.random(shape)
            elif dt.kind == "S":
                arrays[v.path] = np.full(shape, b"x" * dt.itemsize, dtype=dt)
            else:
                arrays[v.path] = np.zeros(shape, dtype=dt)
        out.append(arrays)
    return out


def _sha_nocopy(layout: Layout, arrays: dict) -> str:
    h = hashlib.sha256()
    for v in layout.vars:
        a = np.ascontiguousarray(arrays[v.path])
        if a.dtype != np.dtype(v.dtype):
            a = a.astype(np.dtype(v.dtype))
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


class ProposedShardWriter(store.ShardWriter):
    """Prototype of proposed engine changes, measured beside the engine's writer.

    A (commit_bytes = 0): the SHA-256 of a chunk is computed in a worker thread while HDF5 writes
    it and the shard is fsync'ed (hashlib releases the GIL), hashing the arrays without the copy
    `tobytes()` makes. Same files, same journal entries, same guarantee: a journal line is written
    only after its chunk's data is fsync'ed.
    B (commit_bytes > 0): also group commit: chunks are written as they come, and the shard fsync +
    journal lines + journal fsync happen once per `commit_bytes` of data (and at close). Same
    guarantee per journal line; a crash loses at most the uncommitted group, which resume
    recomputes."""

    _pool = ThreadPoolExecutor(1, thread_name_prefix="twin-sha")
    commit_bytes = 0

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._pending: list = []
        self._pending_bytes = 0

    def write_chunk(self, chunk_id, arrays):
        lo, hi = store.validate_chunk(self.layout, chunk_id, arrays)
        chunk_id = int(chunk_id)
        fut = self._pool.submit(_sha_nocopy, self.layout, arrays)
        self._write_data(chunk_id, arrays)
        n_failed = int(np.count_nonzero(arrays["status"])) if "status" in arrays else 0
        entry = {"chunk": chunk_id, "start": int(lo), "stop": int(hi), "shard": self.shard_rel,
                 "sha256": None, "n_failed": n_failed}
        self._pending.append((entry, fut))
        self._pending_bytes += sum(a.nbytes for a in arrays.values())
        if self._pending_bytes >= self.commit_bytes:
            self._commit()
        return entry

    def _commit(self) -> None:
        if not self._pending:
            return
        self._sync()
        lines = []
        for entry, fut in self._pending:
            entry["sha256"] = fut.result()
            lines.append(json.dumps(entry, separators=(",", ":")) + "\n")
            self._journaled.add(entry["chunk"])
        store._write_all(self._jfd, "".join(lines).encode("utf-8"))
        os.fsync(self._jfd)
        self._pending, self._pending_bytes = [], 0

    def close(self) -> None:
        if self._h5 is not None:
            self._commit()
        super().close()


class GroupCommitShardWriter(ProposedShardWriter):
    """B: A + group commit every 64 MB + datasets made with h5py's low-level API (h5d.create and
    write with one reused creation property list): the same datasets, without the high-level
    `create_dataset` bookkeeping that costs ~60 µs per dataset (19 datasets per chunk here)."""

    commit_bytes = 64_000_000

    def _write_data(self, chunk_id, arrays):
        from h5py import h5d, h5p, h5s, h5t

        gname = store.chunk_group(chunk_id)
        if gname in self._h5:
            del self._h5[gname]
        g = self._h5.create_group(gname)
        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_obj_track_times(False)  # as h5py's create_dataset does
        for v in self.layout.vars:
            a = np.ascontiguousarray(arrays[v.path], dtype=np.dtype(v.dtype))
            parent, _, name = v.path.rpartition("/")
            where = g.require_group(parent) if parent else g
            ds = h5d.create(where.id, name.encode("utf-8"), h5t.py_create(a.dtype, logical=1),
                            h5s.create_simple(a.shape), dcpl=dcpl)
            ds.write(h5s.ALL, h5s.ALL, a)


def _writer(cls, d: Path, layout: Layout, chunks, n: int) -> float:
    a = store.init_run_dir(d, {"layout": store.layout_manifest(layout)})
    with cls(d, a, 0, layout) as w:
        t = time.perf_counter()
        for c in range(n):
            w.write_chunk(c, chunks[c % len(chunks)])
        return time.perf_counter() - t


def _breakdown(d: Path, layout: Layout, chunks, n: int) -> dict | None:
    """ms per chunk of each step of the engine's write_chunk (its own methods, timed one by one)."""
    w0 = store.ShardWriter
    if not all(hasattr(w0, m) for m in ("_write_data", "_sync", "_append_journal")):
        return None  # the writer's steps changed: no breakdown
    a = store.init_run_dir(d, {"layout": store.layout_manifest(layout)})
    t = dict.fromkeys(("sha256", "hdf5_write", "flush_fsync_shard", "journal_fsync"), 0.0)
    with w0(d, a, 0, layout) as w:
        for c in range(n):
            arrays = chunks[c % len(chunks)]
            t0 = time.perf_counter()
            digest = store.chunk_sha256(layout, arrays)
            t1 = time.perf_counter()
            w._write_data(c, arrays)
            t2 = time.perf_counter()
            w._sync()
            t3 = time.perf_counter()
            w._append_journal({"chunk": c, "start": 0, "stop": 0, "shard": w.shard_rel, "sha256": digest})
            t4 = time.perf_counter()
            for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                t[k] += dt
    return {k: 1e3 * v / n for k, v in t.items()}


def _raw(path: Path, bufs: list[list[memoryview]], n: int, sync_each: bool) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t = time.perf_counter()
        for c in range(n):
            for b in bufs[c % len(bufs)]:
                off = 0
                while off < len(b):
                    off += os.write(fd, b[off:])
            if sync_each:
                os.fsync(fd)
        os.fsync(fd)
        return time.perf_counter() - t
    finally:
        os.close(fd)


def measure(work: Path, job_path: Path, chunk_rows: list[int], total_mb: float, reps: int, log) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in chunk_rows:
        lay0 = bench_layout(job_path, rows)
        chunks = synth_chunks(lay0, rows)
        per_chunk = sum(a.nbytes for a in chunks[0].values())
        n = max(2, int(round(total_mb * 1e6 / per_chunk)))
        lay = Layout(rows * n, lay0.time, lay0.time_units, lay0.vars, rows)
        nbytes = n * per_chunk
        bufs = [[memoryview(np.ascontiguousarray(ch[v.path])).cast("B") for v in lay.vars] for ch in chunks]
        log(f"io: {n} chunks of {rows} patients ({per_chunk / 1e6:.2f} MB each, {nbytes / 1e6:.0f} MB), {reps} reps")
        times: dict[str, list[float]] = {k: [] for k in ("engine", "raw_dd", "raw_sync", "proposed", "group")}
        file_bytes = None
        # warm-up: first writes to a fresh directory are slower on some file systems
        _raw(work / "warm.bin", bufs, min(n, 4), False)
        for r in range(reps):
            for kind in times:
                d = work / f"{kind}_{rows}_{r}"
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                if kind == "engine":
                    times[kind].append(_writer(store.ShardWriter, d, lay, chunks, n))
                    file_bytes = sum(p.stat().st_size for p in (d / "shards").iterdir())
                elif kind == "proposed":
                    times[kind].append(_writer(ProposedShardWriter, d, lay, chunks, n))
                elif kind == "group":
                    times[kind].append(_writer(GroupCommitShardWriter, d, lay, chunks, n))
                else:
                    times[kind].append(_raw(d / "raw.bin", bufs, n, kind == "raw_sync"))
                shutil.rmtree(d, ignore_errors=True)
        d = work / f"breakdown_{rows}"
        d.mkdir(parents=True, exist_ok=True)
        breakdown = _breakdown(d, lay, chunks, n)
        shutil.rmtree(d, ignore_errors=True)
        (work / "warm.bin").unlink(missing_ok=True)
        sha = []
        for _ in range(3):
            t = time.perf_counter()
            for c in range(min(n, 8)):
                store.chunk_sha256(lay, chunks[c % 2])
            sha.append((time.perf_counter() - t) / min(n, 8))
        med = {k: statistics.median(v) for k, v in times.items()}
        mbs = {k: nbytes / v / 1e6 for k, v in med.items()}
        results.append({
            "chunk_patients": rows, "chunks": n, "chunk_mb": per_chunk / 1e6, "payload_mb": nbytes / 1e6,
            "engine_file_mb": (file_bytes or 0) / 1e6, "reps": reps,
            "mbs": mbs, "mbs_all": {k: [nbytes / x / 1e6 for x in v] for k, v in times.items()},
            "ms_per_chunk": {k: 1e3 * v / n for k, v in med.items()},
            "engine_breakdown_ms_per_chunk": breakdown, "n_datasets_per_chunk": len(lay.vars),
            "sha256_ms_per_chunk": 1e3 * min(sha), "sha256_mbs": per_chunk / min(sha) / 1e6,
            "ratio_raw_dd_over_engine": mbs["raw_dd"] / mbs["engine"],
            "ratio_raw_sync_over_engine": mbs["raw_sync"] / mbs["engine"],
            "ratio_raw_dd_over_proposed": mbs["raw_dd"] / mbs["proposed"],
            "ratio_raw_dd_over_group": mbs["raw_dd"] / mbs["group"],
        })
    shutil.rmtree(work, ignore_errors=True)
    head = results[0]
    return {"method": __doc__.split("\n\n", 1)[1].strip(), "directory": str(work.parent),
            "results": results,
            "within_2x_engine": all(r["ratio_raw_dd_over_engine"] <= 2.0 for r in results),
            "within_2x_proposed": all(r["ratio_raw_dd_over_proposed"] <= 2.0 for r in results),
            "within_2x_group": all(r["ratio_raw_dd_over_group"] <= 2.0 for r in results),
            "headline": {"chunk_patients": head["chunk_patients"], "engine_mbs": head["mbs"]["engine"],
                         "raw_dd_mbs": head["mbs"]["raw_dd"], "ratio": head["ratio_raw_dd_over_engine"]}}
