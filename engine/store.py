"""Crash-safe result storage: per-rank HDF5 shards, a chunk journal, and the master file.

Run directory::

    RUN_DIR/run.json                   manifest, written once (job sha256, cohort fingerprint, layout…)
    RUN_DIR/attempts/AAA/              one directory per `twin run` invocation (atomic allocation)
    RUN_DIR/shards/aAAA-rRRRR.h5       one HDF5 file per (attempt, rank): /chunk_CCCCCC/<var path>
    RUN_DIR/journal/aAAA-rRRRR.jsonl   one JSON line per finished chunk (after data + fsync)
    RUN_DIR/RUN.h5                     master: virtual datasets over the shards (relative paths)

Rules that make a kill -9 harmless:

* a shard is only ever written by the attempt that created it (a resumed run gets a new attempt
  number and new shard files), so a crash can only damage the shard of the attempt it killed;
* shards use the default (oldest) HDF5 file format, so a file left open by a killed process still
  opens read-only;
* a journal line is appended only after the chunk's data was written, the shard flushed and
  fsync'ed, and the line itself is fsync'ed; a torn last line is ignored;
* on resume every journal entry is re-verified against the shard (sha256 of the chunk's arrays),
  so a damaged shard only means its chunks are computed again.

Virtual dataset source paths are stored relative ("shards/a001-r0000.h5"). HDF5 resolves a relative
source path by trying, in order: the prefixes in $HDF5_VDS_PREFIX (or the dataset access property
`virtual_prefix`), the directory of the master file, then the current directory. With neither
prefix set, RUN.h5 therefore reads its own shards from any working directory, also after the whole
run directory was moved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import h5py
from h5py import h5d, h5g, h5p, h5s, h5t
import numpy as np

from .errors import StoreError
from .layout import Layout, VarSpec

log = logging.getLogger("twin.store")

MANIFEST = "run.json"
MASTER = "RUN.h5"
SHARD_DIR = "shards"
JOURNAL_DIR = "journal"
ATTEMPT_DIR = "attempts"
LAYOUT_ATTR = "twin_layout"  # root attribute of RUN.h5: JSON {n_patients, chunk_size, n_times, vars}

_SHARD_RE = re.compile(r"^a(\d+)-r(\d+)\.(h5|jsonl)$")
_SHARD_REL_RE = re.compile(r"^shards/a\d+-r\d+\.h5$")


# ------------------------------------------------------------------------------------ helpers
def shard_relpath(attempt: int, rank: int) -> str:
    return f"{SHARD_DIR}/a{attempt:03d}-r{rank:04d}.h5"


def journal_relpath(attempt: int, rank: int) -> str:
    return f"{JOURNAL_DIR}/a{attempt:03d}-r{rank:04d}.jsonl"


def chunk_group(chunk_id: int) -> str:
    return f"chunk_{chunk_id:06d}"


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def normalize_json(obj: Any) -> Any:
    """The value as it reads back from JSON (numpy scalars/arrays -> Python, tuples -> lists)."""
    return json.loads(json.dumps(obj, default=_jsonable, sort_keys=True))


def layout_manifest(layout: Layout) -> dict:
    """A JSON-able description of a layout, for run.json (everything that changes the result)."""
    return normalize_json(
        {
            "n_patients": int(layout.n_patients),
            "chunk_size": int(layout.chunk_size),
            "n_times": int(len(layout.time)),
            "time": np.asarray(layout.time, dtype="f8"),
            "time_units": layout.time_units,
            "vars": [
                {"path": v.path, "dims": list(v.dims), "dtype": np.dtype(v.dtype).str, "attrs": v.attrs}
                for v in layout.vars
            ],
        }
    )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _array_bytes(layout: Layout, arrays: dict[str, np.ndarray]) -> Iterator[memoryview]:
    for v in layout.vars:
        a = np.ascontiguousarray(arrays[v.path])
        if a.dtype != np.dtype(v.dtype):
            a = a.astype(np.dtype(v.dtype))
        yield memoryview(a.reshape(-1)).cast("B")  # the raw bytes, no copy


def chunk_sha256(layout: Layout, arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the chunk's arrays in layout order (the raw bytes of each array)."""
    h = hashlib.sha256()
    for b in _array_bytes(layout, arrays):
        h.update(b)
    return h.hexdigest()


def result_digest(entries: dict[int, dict]) -> str:
    """sha256 over the per-chunk sha256 hex strings in chunk order (the result's fingerprint)."""
    h = hashlib.sha256()
    for c in sorted(entries):
        h.update(entries[c]["sha256"].encode("ascii"))
    return h.hexdigest()


def _expected_shape(layout: Layout, v: VarSpec, n_rows: int) -> tuple[int, ...]:
    row = getattr(layout, "row_dim", "patient")
    extra = getattr(layout, "dims", {})
    return tuple(n_rows if d == row else extra[d] if d in extra else len(layout.time) for d in v.dims)


def _check_chunk_id(layout: Layout, chunk_id: int) -> tuple[int, int]:
    if not isinstance(chunk_id, (int, np.integer)) or not 0 <= int(chunk_id) < layout.n_chunks():
        raise ValueError(f"chunk id {chunk_id!r} out of range 0..{layout.n_chunks() - 1}")
    return layout.chunk_bounds(int(chunk_id))


def validate_chunk(layout: Layout, chunk_id: int, arrays: dict[str, np.ndarray]) -> tuple[int, int]:
    """Check keys, shapes and dtypes against the layout; ValueError on any mismatch."""
    lo, hi = _check_chunk_id(layout, chunk_id)
    want = [v.path for v in layout.vars]
    missing = [p for p in want if p not in arrays]
    extra = [p for p in arrays if p not in set(want)]
    if missing or extra:
        raise ValueError(f"chunk {chunk_id}: arrays do not match the layout (missing {missing}, unexpected {extra})")
    for v in layout.vars:
        a = arrays[v.path]
        if not isinstance(a, np.ndarray):
            raise ValueError(f"chunk {chunk_id}: {v.path} is a {type(a).__name__}, not a numpy array")
        shape = _expected_shape(layout, v, hi - lo)
        if a.shape != shape:
            raise ValueError(f"chunk {chunk_id}: {v.path} has shape {a.shape}, layout wants {shape}")
        if a.dtype != np.dtype(v.dtype):
            raise ValueError(f"chunk {chunk_id}: {v.path} has dtype {a.dtype}, layout wants {np.dtype(v.dtype)}")
    return lo, hi


def read_chunk(f: h5py.File, layout: Layout, chunk_id: int) -> dict[str, np.ndarray]:
    """Read one chunk from an open shard, checking shapes/dtypes (KeyError/ValueError if wrong)."""
    lo, hi = layout.chunk_bounds(chunk_id)
    g = f[chunk_group(chunk_id)]
    out = {}
    for v in layout.vars:
        ds = g[v.path]
        shape = _expected_shape(layout, v, hi - lo)
        if ds.shape != shape or ds.dtype != np.dtype(v.dtype):
            raise ValueError(f"{v.path}: shape {ds.shape} dtype {ds.dtype}, layout wants {shape} {np.dtype(v.dtype)}")
        out[v.path] = ds[()]
    return out


# ------------------------------------------------------------------------------------ run dir
def _describe_diff(key: str, old: Any, new: Any) -> str:
    def short(x: Any) -> str:
        s = x if isinstance(x, str) else json.dumps(x)
        return s if len(s) <= 16 else s[:12] + "…"

    if isinstance(old, dict) and isinstance(new, dict):
        sub = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"{key} ({', '.join(sub)})"
    if old is None:
        return f"{key} (absent in run.json)"
    if new is None:
        return f"{key} (absent in this job)"
    if isinstance(old, (list, dict)) or isinstance(new, (list, dict)):
        return key
    return f"{key} ({short(old)} in run.json, {short(new)} now)"


def load_manifest(run_dir: str | Path) -> dict:
    p = Path(run_dir) / MANIFEST
    try:
        with open(p, encoding="utf-8") as fh:
            m = json.load(fh)
    except FileNotFoundError:
        raise StoreError(f"{p} does not exist: not a run directory") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{p} is unreadable ({e}); use a new run directory") from None
    if not isinstance(m, dict):
        raise StoreError(f"{p} is not a JSON object; use a new run directory")
    return m


def _existing_attempts(run_dir: Path) -> list[int]:
    nums = []
    for sub, rx in ((ATTEMPT_DIR, re.compile(r"^(\d+)$")), (SHARD_DIR, _SHARD_RE), (JOURNAL_DIR, _SHARD_RE)):
        d = run_dir / sub
        if d.is_dir():
            for name in os.listdir(d):
                m = rx.match(name)
                if m:
                    nums.append(int(m.group(1)))
    return nums


def init_run_dir(run_dir: str | Path, manifest: dict) -> int:
    """Rank 0, once per `twin run`: create the run directory (or check it belongs to this job) and
    allocate a new attempt number (1, 2, …).

    run.json is written if absent; otherwise every key must equal `manifest` (after a JSON round
    trip), else StoreError naming what differs. The manifest must therefore hold only what
    identifies the result (job sha256, cohort fingerprint, layout…), not times or rank counts.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for sub in (SHARD_DIR, JOURNAL_DIR, ATTEMPT_DIR):
            (run_dir / sub).mkdir(exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None
    if not isinstance(manifest, dict):
        raise TypeError("manifest must be a dict")
    new = normalize_json(manifest)
    path = run_dir / MANIFEST
    if not path.exists():
        tmp = run_dir / f".{MANIFEST}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(new, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic create-if-absent (a concurrent start loses the race)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(run_dir)
    old = load_manifest(run_dir)
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        what = "; ".join(_describe_diff(k, old.get(k), new.get(k)) for k in diffs)
        raise StoreError(
            f"run directory {run_dir} belongs to a different job or cohort: {what} differs; "
            f"use a new run directory"
        )
    # allocate the attempt number atomically
    n = max(_existing_attempts(run_dir), default=0) + 1
    while True:
        try:
            os.mkdir(run_dir / ATTEMPT_DIR / f"{n:03d}")
            break
        except FileExistsError:
            n += 1
    _fsync_dir(run_dir / ATTEMPT_DIR)
    return n


class RunLock:
    """Exclusive lock on a run directory for the lifetime of one `twin run` (rank 0 holds it).

    A second `twin run` on the same directory while the first is alive gets a StoreError; the
    lock dies with its process (flock), so a kill -9 leaves nothing to clean up. On a file system
    without flock support the lock is skipped with a warning.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot create run directory {self.path.parent}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            finally:
                os.close(fd)
            raise StoreError(f"run directory {self.path.parent} is in use by {holder}; wait for it or use another run directory") from None
        except OSError as e:
            os.close(fd)
            log.warning("cannot lock %s (%s): concurrent runs in this directory are not detected", self.path, e)
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"twin run pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------ writer
class ShardWriter:
    """Writes the chunks of one (attempt, rank) into its own shard and journal.

    Group commit: chunks are written to the shard as they come; the shard fsync, their journal
    lines and the journal fsync happen once per `commit_bytes` of data (16 MB) or once
    `commit_seconds` have passed since the last commit (checked at each write, so a chunk that
    took longer than that to compute is committed at once), and at close; the fsyncs and lines of
    a group run in a worker thread while the next chunks are written. Each journal line still
    follows its chunk's fsync'ed data, so a kill loses at most the uncommitted groups, which
    resume recomputes. Two blocking fsyncs per chunk made the store 3-4x slower than a raw write
    of the same bytes (benchmarks/RESULTS.md). The SHA-256 of a chunk runs in a worker thread (hashlib
    releases the GIL) while HDF5 writes it and the next chunk is computed; the writer holds the
    chunk's arrays until its commit. ``commit_bytes=0`` commits every chunk."""

    _hasher = ThreadPoolExecutor(1, thread_name_prefix="twin-sha256")
    _committer = ThreadPoolExecutor(1, thread_name_prefix="twin-commit")

    def __init__(self, run_dir: str | Path, attempt: int, rank: int, layout: Layout,
                 commit_bytes: int = 16_000_000, commit_seconds: float = 1.0):
        self.run_dir = Path(run_dir)
        self.attempt = int(attempt)
        self.rank = int(rank)
        self.layout = layout
        self.commit_bytes = int(commit_bytes)
        self.commit_seconds = float(commit_seconds)
        self.shard_rel = shard_relpath(self.attempt, self.rank)
        self.journal_rel = journal_relpath(self.attempt, self.rank)
        self._h5: h5py.File | None = None
        self._jfd: int | None = None
        self._journaled: set[int] = set()
        self._started: set[int] = set()  # chunks whose data this writer began to write
        self._written: set[int] = set()  # ... and finished writing
        self._committing: Future | None = None  # the group whose fsync + journal lines are in flight
        self._pending: list[tuple[dict, Future]] = []
        self._pending_bytes = 0
        for sub in (SHARD_DIR, JOURNAL_DIR):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        path = self.run_dir / self.shard_rel
        if path.exists():
            raise StoreError(f"{path} exists: every run attempt must write new shards")
        # default libver (oldest format): a file left open by a kill -9 still opens read-only
        self._h5 = h5py.File(path, "x", locking=False)
        self._fd = self._h5.id.get_vfd_handle()
        self._jfd = os.open(self.run_dir / self.journal_rel, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._h5.flush()
        os.fsync(self._fd)
        _fsync_dir(self.run_dir / SHARD_DIR)
        _fsync_dir(self.run_dir / JOURNAL_DIR)
        # one dataset-creation property list for every dataset: h5py's high-level create_dataset
        # costs ~60 us of bookkeeping per dataset, as much as writing a 1,000-patient chunk
        self._dcpl = h5p.create(h5p.DATASET_CREATE)
        self._dcpl.set_obj_track_times(False)  # as create_dataset does: identical bytes per run
        self._last_commit = time.monotonic()

    # the three steps of a chunk's write, separate so tests can stop a process between them
    def _write_data(self, chunk_id: int, arrays: dict[str, np.ndarray]) -> None:
        gname = chunk_group(chunk_id)
        if chunk_id in self._started and gname in self._h5:  # an earlier write of this chunk failed
            del self._h5[gname]
        self._started.add(chunk_id)
        # h5py's low-level API throughout: its high-level group lookups and creation cost ~2 ms
        # per 19-dataset chunk, as much as writing the chunk's 2.8 MB
        groups = {"": h5g.create(self._h5.id, gname.encode("utf-8"))}
        for v in self.layout.vars:
            a = np.ascontiguousarray(arrays[v.path], dtype=np.dtype(v.dtype))
            parent, _, name = v.path.rpartition("/")
            ds = h5d.create(self._group(groups, parent),
                            name.encode("utf-8"), h5t.py_create(a.dtype, logical=1), h5s.create_simple(a.shape),
                            dcpl=self._dcpl)
            if a.size:
                ds.write(h5s.ALL, h5s.ALL, a)

    @staticmethod
    def _group(groups: dict, path: str):
        """The chunk's subgroup `path` (e.g. "cohort"), created on first use."""
        g = groups.get(path)
        if g is None:
            parent, _, name = path.rpartition("/")
            g = groups[path] = h5g.create(ShardWriter._group(groups, parent), name.encode("utf-8"))
        return g

    def _sync(self) -> None:
        self._h5.flush()
        os.fsync(self._fd)

    def _append_journal(self, entry: dict) -> None:
        self._append_lines([entry])

    def _append_lines(self, entries: list[dict]) -> None:
        text = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries)
        _write_all(self._jfd, text.encode("utf-8"))
        os.fsync(self._jfd)

    def write_chunk(self, chunk_id: int, arrays: dict[str, np.ndarray]) -> dict:
        """Write one chunk and queue its journal entry (committed per group, see the class).

        Returns the journal entry; its "sha256" is filled in at commit (at the latest on close)."""
        if self._h5 is None:
            raise ValueError("ShardWriter is closed")
        lo, hi = validate_chunk(self.layout, chunk_id, arrays)
        chunk_id = int(chunk_id)
        if chunk_id in self._written:
            raise ValueError(f"chunk {chunk_id} was already written by this writer")
        # hashed in the worker while HDF5 writes and the caller computes the next chunk; the
        # caller must not modify `arrays` afterwards (the runner never does: each chunk is new)
        hashing = self._hasher.submit(chunk_sha256, self.layout, arrays)
        self._write_data(chunk_id, arrays)
        self._written.add(chunk_id)
        n_failed = int(np.count_nonzero(arrays["status"])) if "status" in arrays else 0
        entry = {
            "chunk": chunk_id,
            "start": int(lo),
            "stop": int(hi),
            "shard": self.shard_rel,
            "sha256": None,
            "n_failed": n_failed,
        }
        self._pending.append((entry, hashing))
        self._pending_bytes += sum(np.asarray(a).nbytes for a in arrays.values())
        if (self._pending_bytes >= self.commit_bytes
                or time.monotonic() - self._last_commit >= self.commit_seconds):
            self._commit(wait=False)
        return entry

    def commit(self) -> None:
        """Make every chunk written so far durable and journal it (returns when it is)."""
        self._commit(wait=True)

    def _commit(self, wait: bool) -> None:
        # HDF5 flushes its metadata here (HDF5 is not thread-safe); the fsync of the shard, the
        # journal lines and the journal fsync run in a worker while the next chunks are written,
        # as a raw writer's disk flush overlaps its writes. One group in flight at a time, so
        # journal lines keep their order and each follows its own data's fsync.
        self._await_commit()
        if self._pending:
            self._h5.flush()
            group, self._pending, self._pending_bytes = self._pending, [], 0
            self._committing = self._committer.submit(self._finish_commit, group)
            if wait:
                self._await_commit()
        self._last_commit = time.monotonic()

    def _finish_commit(self, group: list) -> None:
        os.fsync(self._fd)
        entries = [e for e, _ in group]
        for e, hashing in group:
            e["sha256"] = hashing.result()
        self._append_lines(entries)
        self._journaled.update(e["chunk"] for e in entries)

    def _await_commit(self) -> None:
        if self._committing is not None:
            fut, self._committing = self._committing, None
            fut.result()  # a failed fsync or journal write surfaces here

    def close(self) -> None:
        if self._h5 is not None:
            try:
                self.commit()  # waits for the group in flight too
                self._h5.flush()
                os.fsync(self._fd)
            finally:
                self._h5.close()
                self._h5 = None
        if self._jfd is not None:
            os.close(self._jfd)
            self._jfd = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------ resume
_ENTRY_KEYS = {"chunk": int, "start": int, "stop": int, "shard": str, "sha256": str}


def read_journals(run_dir: str | Path) -> Iterator[tuple[int, int, int, dict]]:
    """Yield (attempt, rank, line number, entry) for every well-formed journal line, in
    (attempt, rank, line) order. Torn or garbled lines are skipped with a warning."""
    jdir = Path(run_dir) / JOURNAL_DIR
    if not jdir.is_dir():
        return
    files = []
    for name in os.listdir(jdir):
        m = _SHARD_RE.match(name)
        if m and m.group(3) == "jsonl":
            files.append((int(m.group(1)), int(m.group(2)), name))
    for attempt, rank, name in sorted(files):
        try:
            data = (jdir / name).read_bytes()
        except OSError as e:
            log.warning("journal %s unreadable (%s): its chunks will be recomputed", name, e)
            continue
        lines = data.split(b"\n")
        if lines[-1]:
            log.warning("journal %s: torn last line ignored (writer was killed while appending)", name)
        for i, raw in enumerate(lines[:-1], start=1):
            if not raw.strip():
                continue
            try:
                e = json.loads(raw)
                ok = isinstance(e, dict) and all(
                    isinstance(e.get(k), t) and not isinstance(e.get(k), bool) for k, t in _ENTRY_KEYS.items()
                )
            except ValueError:
                ok = False
            if not ok:
                log.warning("journal %s line %d is not a valid entry: ignored", name, i)
                continue
            yield attempt, rank, i, e


def done_chunks(run_dir: str | Path, layout: Layout) -> dict[int, dict]:
    """Rank 0 at start: the verified journal entries {chunk id: entry}.

    Every entry is checked against its shard (opened read-only): the chunk's arrays must have the
    layout's shapes/dtypes and their sha256 must equal the journal's. Entries that fail are dropped
    with a warning (the chunk will be recomputed); for a chunk finished twice the first valid entry
    (lowest attempt, then rank, then line) is kept.
    """
    run_dir = Path(run_dir)
    out: dict[int, dict] = {}
    files: dict[str, h5py.File | None] = {}
    try:
        for attempt, rank, lineno, e in read_journals(run_dir):
            c = e["chunk"]
            if c in out:
                continue
            where = f"journal a{attempt:03d}-r{rank:04d} line {lineno} (chunk {c})"
            if not 0 <= c < layout.n_chunks() or (e["start"], e["stop"]) != layout.chunk_bounds(c):
                log.warning("%s: chunk id/bounds do not fit the layout: recomputed", where)
                continue
            shard = e["shard"]
            if not _SHARD_REL_RE.match(shard):
                log.warning("%s: bad shard path %r: recomputed", where, shard)
                continue
            if shard not in files:
                try:
                    files[shard] = h5py.File(run_dir / shard, "r", locking=False)
                except Exception as ex:  # missing, truncated, garbage
                    log.warning("shard %s cannot be opened (%s): its chunks will be recomputed", shard, ex)
                    files[shard] = None
            f = files[shard]
            if f is None:
                continue
            try:
                got = chunk_sha256(layout, read_chunk(f, layout, c))
            except Exception as ex:
                log.warning("%s: cannot read chunk from %s (%s): recomputed", where, shard, ex)
                continue
            if got != e["sha256"]:
                log.warning("%s: checksum mismatch in %s: recomputed", where, shard)
                continue
            out[c] = e
    finally:
        for f in files.values():
            if f is not None:
                try:
                    f.close()
                except Exception:
                    pass
    return out


# ------------------------------------------------------------------------------------ master
def _attr_value(v: Any) -> Any:
    """An HDF5/netCDF-friendly attribute value, or None to skip."""
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return np.int8(v)
    if isinstance(v, (str, int, float, np.number, np.ndarray, bytes)):
        return v
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        if v and all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in v):
            return np.asarray(v)
        return json.dumps(v, default=_jsonable)
    if isinstance(v, dict):
        return json.dumps(v, default=_jsonable, sort_keys=True)
    return str(v)


def _set_attrs(obj: h5py.HLObject, attrs: dict) -> None:
    for k, v in attrs.items():
        val = _attr_value(v)
        if val is not None:
            obj.attrs[k] = val


def _fill_array(v: VarSpec) -> np.ndarray:
    dt = np.dtype(v.dtype)
    if dt.kind == "S":
        # h5py's set_fill_value mis-handles fixed-length strings (garbage fill); go through a
        # variable-length string, which HDF5 converts to the fixed-length type correctly
        return np.array(v.fill(), dtype=h5py.string_dtype("ascii"))
    return np.array(v.fill(), dtype=dt)


def _create_vds(parent: h5py.Group, name: str, shape: tuple, dtype: np.dtype, fill: np.ndarray,
                mappings: list[tuple[int, int, str, str]]) -> h5py.Dataset:
    """Virtual dataset `name` in `parent`: rows [lo, hi) <- source (file, dataset), whole."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.VIRTUAL)
    dcpl.set_fill_value(fill)
    rest = tuple(shape[1:])
    for lo, hi, fname, dname in mappings:
        vspace = h5py.h5s.create_simple(shape)
        vspace.select_hyperslab((lo,) + (0,) * len(rest), (hi - lo,) + rest)
        sspace = h5py.h5s.create_simple((hi - lo,) + rest)
        dcpl.set_virtual(vspace, fname.encode("utf-8"), dname.encode("utf-8"), sspace)
    tid = h5py.h5t.py_create(dtype, logical=1)
    h5py.h5d.create(parent.id, name.encode("utf-8"), tid, h5py.h5s.create_simple(shape), dcpl=dcpl)
    return parent[name]


def build_master(run_dir: str | Path, layout: Layout, entries: dict[int, dict], root_attrs: dict) -> Path:
    """Rank 0 at the end: write RUN.h5 (atomically) with virtual datasets over the shards."""
    run_dir = Path(run_dir)
    n_chunks = layout.n_chunks()
    missing = [c for c in range(n_chunks) if c not in entries]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (", …" if len(missing) > 20 else "")
        raise StoreError(f"cannot build {MASTER}: {len(missing)} of {n_chunks} chunks missing ({shown})")
    absent = sorted({entries[c]["shard"] for c in range(n_chunks) if not (run_dir / entries[c]["shard"]).is_file()})
    if absent:
        raise StoreError(f"cannot build {MASTER}: shard file(s) missing: {', '.join(absent)}")
    for c in range(n_chunks):
        if (entries[c]["start"], entries[c]["stop"]) != layout.chunk_bounds(c):
            raise StoreError(f"cannot build {MASTER}: chunk {c} bounds do not fit the layout")

    N, T = layout.n_patients, len(layout.time)
    tmp = run_dir / (MASTER + ".tmp")
    tmp.unlink(missing_ok=True)
    # v110+: virtual datasets need it, and it allows attributes > 64 KiB (long job texts)
    with h5py.File(tmp, "w", libver=("v110", "latest"), locking=False) as f:
        row = getattr(layout, "row_dim", "patient")
        p = f.create_dataset(row, data=np.arange(N, dtype=np.int64))
        p.attrs["long_name"] = f"global {row} index"
        p.make_scale(row)
        scales = {row: p}
        if row == "patient" or any("time" in v.dims for v in layout.vars):
            t = f.create_dataset("time", data=np.asarray(layout.time, dtype=np.float64))
            t.attrs["units"] = layout.time_units
            t.attrs["long_name"] = "sample time"
            t.make_scale("time")
            scales["time"] = t
        for d, size in getattr(layout, "dims", {}).items():  # extra fixed dimensions
            vals = layout.coords.get(d, np.arange(size, dtype=np.int64))
            s = f.create_dataset(d, data=vals)
            s.make_scale(d)
            scales[d] = s
        for v in layout.vars:
            dt = np.dtype(v.dtype)
            parent_path, _, name = v.path.rpartition("/")
            parent = f.require_group(parent_path) if parent_path else f
            mappings = []
            for c in range(n_chunks):
                lo, hi = layout.chunk_bounds(c)
                mappings.append((lo, hi, entries[c]["shard"], f"/{chunk_group(c)}/{v.path}"))
            ds = _create_vds(parent, name, _expected_shape(layout, v, N), dt, _fill_array(v), mappings)
            _set_attrs(ds, v.attrs)
            for i, d in enumerate(v.dims):
                ds.dims[i].attach_scale(scales[d])
        _set_attrs(f, root_attrs)
        f.attrs[LAYOUT_ATTR] = json.dumps(
            {
                **({"row_dim": row, "dims": dict(layout.dims)} if row != "patient" else {}),
                "n_patients": N,
                "chunk_size": layout.chunk_size,
                "n_times": T,
                "vars": [{"path": v.path, "dims": list(v.dims), "dtype": np.dtype(v.dtype).str} for v in layout.vars],
            }
        )
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    final = run_dir / MASTER
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    return final
