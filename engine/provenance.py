"""Provenance of a run and its audit chain.

`collect` gathers what goes on the root of RUN.h5 (job text and hash, package version, git
revision, host, library versions, backend, device, ranks, seed, start time).

`RUN_DIR/audit.jsonl` is a hash chain: every record carries "seq" (0, 1, …), "prev" (the previous
record's hash, 64 zeros for the first) and "hash" = sha256 of the canonical JSON of the record
without "hash" (sort_keys, separators=(',', ':')). RUN.h5 holds the last hash as root attribute
`audit_head`, and the last "complete" record holds `result_sha256` (see `engine.store.result_digest`),
so `verify` ties the chain, the job text and the numbers in the shards together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .store import (
    LAYOUT_ATTR,
    MASTER,
    _fsync_dir,
    _jsonable,
    read_journals,
    result_digest,
)

log = logging.getLogger("twin.provenance")

AUDIT = "audit.jsonl"
GENESIS = "0" * 64


# ------------------------------------------------------------------------------------ collect
def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def package_version() -> str:
    try:
        from . import __version__

        return str(__version__)
    except Exception:
        pass
    try:
        from importlib.metadata import version

        return version("twin-engine")
    except Exception:
        return "unknown"


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        r = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"},
        )
    except Exception:
        return None
    return r.stdout if r.returncode == 0 else None


def git_revision(path: str | Path | None = None) -> str:
    """HEAD of the git checkout holding the installed package ('-dirty' if `git status
    --porcelain` lists anything), or 'unknown' (not a checkout, no git, no commit…). Never fails."""
    try:
        pkg = Path(path) if path is not None else Path(__file__).resolve().parent
        # an installed copy inside someone's site-packages is not "the source tree"
        if any(part in ("site-packages", "dist-packages") for part in pkg.parts):
            return "unknown"
        head = _git(["rev-parse", "HEAD"], pkg)
        if not head or len(head.strip()) < 7:
            return "unknown"
        rev = head.strip()
        status = _git(["status", "--porcelain"], pkg)
        if status is None or status.strip():
            rev += "-dirty"
        return rev
    except Exception:
        return "unknown"


def collect(loaded_job_text: str, job_sha256: str, backend: str, device: str, ranks: int, seed: int) -> dict:
    """Provenance for the root of RUN.h5 (all values are str / int)."""
    import h5py

    return {
        "job_toml": loaded_job_text,
        "job_sha256": job_sha256,
        "package": "twin-engine",
        "package_version": package_version(),
        "git_revision": git_revision(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "numpy_version": np.__version__,
        "h5py_version": h5py.version.version,
        "hdf5_version": h5py.version.hdf5_version,
        "backend": backend,
        "device": device,
        "ranks": int(ranks),
        "seed": int(seed),
        "start_time": utc_now(),
    }


# ------------------------------------------------------------------------------------ chain
def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=_jsonable).encode("utf-8")


def record_hash(record: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _read_lines(path: Path) -> tuple[list[bytes], bytes]:
    """Complete lines and the torn tail (bytes after the last newline)."""
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")
    return lines, tail


def read_chain(run_dir: str | Path) -> list[dict]:
    """The records of audit.jsonl (complete, parseable lines only)."""
    p = Path(run_dir) / AUDIT
    if not p.exists():
        return []
    out = []
    for raw in _read_lines(p)[0]:
        if raw.strip():
            try:
                out.append(json.loads(raw))
            except ValueError:
                pass
    return out


def append_record(run_dir: str | Path, record: dict) -> str:
    """Append `record` to RUN_DIR/audit.jsonl with seq/prev/hash; fsync; return its hash."""
    run_dir = Path(run_dir)
    path = run_dir / AUDIT
    seq, prev = 0, GENESIS
    if path.exists():
        lines, tail = _read_lines(path)
        if tail:
            # a kill while appending left a partial line: it never was a record
            log.warning("%s: removing a torn last line (%d bytes)", path, len(tail))
            with open(path, "r+b") as fh:
                fh.truncate(path.stat().st_size - len(tail))
                fh.flush()
                os.fsync(fh.fileno())
        last = None
        for raw in reversed(lines):
            if raw.strip():
                last = raw
                break
        if last is not None:
            try:
                prev_rec = json.loads(last)
                seq, prev = int(prev_rec["seq"]) + 1, str(prev_rec["hash"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}: last record is unreadable; cannot extend the audit chain") from None
    rec = json.loads(canonical({k: v for k, v in record.items() if k not in ("seq", "prev", "hash")}))
    rec["seq"] = seq
    rec["prev"] = prev
    h = record_hash(rec)
    rec["hash"] = h
    line = json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        data = line.encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        _fsync_dir(run_dir)
    return h


# ------------------------------------------------------------------------------------ verify
def _check_chain(path: Path, problems: list[str]) -> list[dict]:
    try:
        lines, tail = _read_lines(path)
    except FileNotFoundError:
        problems.append(f"{path.name} is missing")
        return []
    except OSError as e:
        problems.append(f"{path.name} is unreadable: {e}")
        return []
    records: list[dict] = []
    expect_seq, prev = 0, GENESIS
    for i, raw in enumerate(lines, start=1):
        where = f"{path.name} line {i}"
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError
        except ValueError:
            problems.append(f"{where}: not a JSON record")
            continue
        seq, h = rec.get("seq"), rec.get("hash")
        if seq != expect_seq:
            problems.append(f"{where}: seq is {seq!r}, expected {expect_seq} (record missing or reordered)")
        if rec.get("prev") != prev:
            problems.append(f"{where}: prev does not match the hash of the record before (chain broken)")
        if h != record_hash(rec):
            problems.append(f"{where}: hash does not match the record's content (record altered)")
        records.append(rec)
        expect_seq = (seq + 1) if isinstance(seq, int) and not isinstance(seq, bool) else expect_seq + 1
        prev = h
    if tail.strip():
        problems.append(f"{path.name}: incomplete last line (a write was interrupted)")
    if not records:
        problems.append(f"{path.name} holds no records")
    return records


def _attr_str(attrs, key: str) -> str | None:
    if key not in attrs:
        return None
    v = attrs[key]
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return str(v)


def _recompute_digest(run_dir: Path, f, problems: list[str]) -> str | None:
    """Re-hash every chunk's arrays as read through RUN.h5's virtual datasets."""
    try:
        meta = json.loads(_attr_str(f.attrs, LAYOUT_ATTR))
        n, cs = int(meta["n_patients"]), int(meta["chunk_size"])
        vars_ = [(v["path"], np.dtype(v["dtype"])) for v in meta["vars"]]
    except Exception:
        problems.append(f"{MASTER}: root attribute {LAYOUT_ATTR!r} missing or unreadable")
        return None
    # every virtual source must exist (HDF5 silently returns fill values for a missing one)
    missing = set()
    dsets = {}
    for path, dt in vars_:
        try:
            ds = f[path]
        except KeyError:
            problems.append(f"{MASTER}: dataset {path} is missing")
            return None
        dsets[path] = ds
        if ds.is_virtual:
            for m in ds.virtual_sources():
                if m.file_name != "." and not (run_dir / m.file_name).is_file():
                    missing.add(m.file_name)
    for m in sorted(missing):
        problems.append(f"{MASTER}: shard {m} is missing")
    journal = {}
    for _a, _r, _l, e in read_journals(run_dir):
        journal.setdefault((e["shard"], e["chunk"]), e["sha256"])
    shard_of = {}
    first = dsets[vars_[0][0]] if vars_ else None
    if first is not None and first.is_virtual:
        for m in first.virtual_sources():
            name = m.dset_name.strip("/").split("/")[0]
            if name.startswith("chunk_"):
                shard_of[int(name[6:])] = m.file_name
    entries = {}
    bad = []
    for c in range(-(-n // cs)):
        lo, hi = c * cs, min((c + 1) * cs, n)
        h = hashlib.sha256()
        try:
            for path, dt in vars_:
                a = np.ascontiguousarray(dsets[path][lo:hi])
                if a.dtype != dt:
                    a = a.astype(dt)
                h.update(a.tobytes())
        except Exception as e:
            problems.append(f"{MASTER}: chunk {c} unreadable ({e})")
            return None
        entries[c] = {"sha256": h.hexdigest()}
        jsha = journal.get((shard_of.get(c), c))
        if jsha is not None and jsha != entries[c]["sha256"]:
            bad.append(c)
    if bad:
        shown = ", ".join(map(str, bad[:20])) + (", …" if len(bad) > 20 else "")
        problems.append(f"data of chunk(s) {shown} no longer match their journal checksums")
    return result_digest(entries)


def verify(run_dir: str | Path) -> list[str]:
    """Problems found in the run's audit chain and result (empty list = OK). Never raises for
    missing or damaged files: they are reported."""
    import h5py

    run_dir = Path(run_dir)
    problems: list[str] = []
    records = _check_chain(run_dir / AUDIT, problems)
    completes = [r for r in records if r.get("event") == "complete"]
    master = run_dir / MASTER
    if not completes:
        problems.append("no 'complete' record: the run has not finished, its result cannot be audited")
        if not master.exists():
            return problems
    if not master.exists():
        problems.append(f"{MASTER} is missing")
        return problems
    try:
        f = h5py.File(master, "r", locking=False)
    except Exception as e:
        problems.append(f"{MASTER} cannot be opened: {e}")
        return problems
    with f:
        job_text = _attr_str(f.attrs, "job_toml")
        if job_text is None:
            problems.append(f"{MASTER}: root attribute 'job_toml' is missing")
        else:
            sha = hashlib.sha256(job_text.encode("utf-8")).hexdigest()
            if _attr_str(f.attrs, "job_sha256") not in (None, sha):
                problems.append(f"{MASTER}: root attribute job_sha256 does not match the stored job text")
            for r in records:
                if "job_sha256" in r and r["job_sha256"] != sha:
                    problems.append(
                        f"audit record seq {r.get('seq')}: job_sha256 does not match the job text in {MASTER}"
                    )
        head = _attr_str(f.attrs, "audit_head")
        if records and head != records[-1].get("hash"):
            problems.append(f"{MASTER}: audit_head does not equal the hash of the last audit record")
        if completes:
            want = completes[-1].get("result_sha256")
            got = _recompute_digest(run_dir, f, problems)
            if want is None:
                problems.append("the last 'complete' record has no result_sha256")
            elif got is not None and got != want:
                problems.append("result digest mismatch: the data in the shards differ from the audited result")
    return problems
