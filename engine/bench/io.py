"""HDF5 write bandwidth: `ShardWriter.write_chunk` vs a raw dd-style write of the same bytes.

Chunks have the benchmark job's real layout (C and E patient × 169 float64, status, arm, cohort
covariates and parameters, biomarkers), filled with random numbers. In the same directory, with
the same total bytes (the arrays' payload), interleaved repetitions, median reported:

  engine            the engine's ShardWriter as `twin run` uses it: per chunk validate, SHA-256 of
                    the arrays (in a second thread, during the HDF5 write), HDF5 datasets; per
                    group (16 MB or 1 s) flush, then fsync of the shard + journal lines + fsync in a worker thread while the next chunks are written; close
  engine_per_chunk  the same writer committing every chunk (2 fsyncs per chunk), the policy the
                    engine had before group commit
  raw_dd            os.write of each chunk's bytes, one fsync at the end (dd bs=CHUNK conv=fsync)
  raw_sync          os.write + fsync per chunk                            (dd bs=CHUNK oflag=dsync)
  sha256            hashing the same arrays in memory, no IO (what the engine pays that dd does not)

MB/s = payload bytes / wall time, 1 MB = 1e6 bytes. os.sync() before each timed write.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
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


def _writer(d: Path, layout: Layout, chunks, n: int, **policy) -> float:
    """Seconds to write n chunks with the engine's ShardWriter, close (final commit) included."""
    a = store.init_run_dir(d, {"layout": store.layout_manifest(layout)})
    t = time.perf_counter()
    with store.ShardWriter(d, a, 0, layout, **policy) as w:
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
    with w0(d, a, 0, layout, commit_bytes=0) as w:
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
        times: dict[str, list[float]] = {k: [] for k in ("engine", "engine_per_chunk", "raw_dd", "raw_sync")}
        file_bytes = None
        # warm-up: first writes to a fresh directory are slower on some file systems
        _raw(work / "warm.bin", bufs, min(n, 4), False)
        for r in range(reps):
            for kind in times:
                d = work / f"{kind}_{rows}_{r}"
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                # every writer starts with no one else's dirty pages in the cache: otherwise the
                # kernel's writeback of earlier sections (or the previous writer) lands on whoever
                # runs next
                os.sync()
                if kind == "engine":
                    times[kind].append(_writer(d, lay, chunks, n))
                    file_bytes = sum(p.stat().st_size for p in (d / "shards").iterdir())
                elif kind == "engine_per_chunk":
                    times[kind].append(_writer(d, lay, chunks, n, commit_bytes=0))
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
            "ratio_raw_dd_over_engine_per_chunk": mbs["raw_dd"] / mbs["engine_per_chunk"],
        })
    shutil.rmtree(work, ignore_errors=True)
    head = results[0]
    return {"method": __doc__.split("\n\n", 1)[1].strip(), "directory": work.parent.name,
            "results": results,
            "within_2x_engine": all(r["ratio_raw_dd_over_engine"] <= 2.0 for r in results),
            "headline": {"chunk_patients": head["chunk_patients"], "engine_mbs": head["mbs"]["engine"],
                         "raw_dd_mbs": head["mbs"]["raw_dd"], "ratio": head["ratio_raw_dd_over_engine"]}}
