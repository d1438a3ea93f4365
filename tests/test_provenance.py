"""engine.provenance: collect, the audit hash chain, and verify against RUN.h5 and the shards."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest

from engine import provenance, store
from tests.test_store import make_arrays, make_layout, manifest

JOB = '[job]\nname = "demo"\nseed = 7\n'
JOB_SHA = hashlib.sha256(JOB.encode()).hexdigest()


def complete_run(run: Path, interrupted_first: bool = True) -> Path:
    """A run as the runner makes it: start / interrupted / start / complete, then RUN.h5."""
    lay = make_layout()
    m = {**manifest(lay), "job_sha256": JOB_SHA}
    prov = provenance.collect(JOB, JOB_SHA, backend="numpy", device="cpu", ranks=2, seed=7)
    if interrupted_first:
        a = store.init_run_dir(run, m)
        provenance.append_record(run, {"event": "start", "attempt": a, "job_sha256": JOB_SHA, "ranks": 2,
                                       "backend": "numpy", "host": prov["host"], "time": provenance.utc_now()})
        with store.ShardWriter(run, a, 0, lay) as w:
            w.write_chunk(1, make_arrays(lay, 1))
        provenance.append_record(run, {"event": "interrupted", "attempt": a, "chunks_done": 1,
                                       "time": provenance.utc_now()})
    a = store.init_run_dir(run, m)
    provenance.append_record(run, {"event": "start", "attempt": a, "job_sha256": JOB_SHA, "ranks": 2,
                                   "backend": "numpy", "host": prov["host"], "time": provenance.utc_now()})
    done = store.done_chunks(run, lay)
    with store.ShardWriter(run, a, 0, lay) as w0, store.ShardWriter(run, a, 1, lay) as w1:
        for c in range(lay.n_chunks()):
            if c not in done:
                done[c] = (w0, w1)[c % 2].write_chunk(c, make_arrays(lay, c))
    digest = store.result_digest(done)
    head = provenance.append_record(run, {"event": "complete", "attempt": a, "chunks_done": len(done),
                                          "result_sha256": digest, "time": provenance.utc_now()})
    return store.build_master(run, lay, done, {**prov, "audit_head": head, "result_sha256": digest,
                                               "end_time": provenance.utc_now()})


def rewrite_lines(path: Path, fn) -> None:
    lines = path.read_text().splitlines()
    path.write_text("".join(x + "\n" for x in fn(lines)))


def test_clean_chain_verifies(tmp_path):
    complete_run(tmp_path)
    assert provenance.verify(tmp_path) == []
    recs = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in recs] == [0, 1, 2, 3]
    assert recs[0]["prev"] == "0" * 64
    for a, b in zip(recs, recs[1:]):
        assert b["prev"] == a["hash"]
    r = dict(recs[2])
    h = r.pop("hash")
    assert h == hashlib.sha256(json.dumps(r, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_tampered_field_is_reported(tmp_path):
    complete_run(tmp_path)

    def tamper(lines):
        r = json.loads(lines[0])
        r["ranks"] = 64
        lines[0] = json.dumps(r, sort_keys=True, separators=(",", ":"))
        return lines

    rewrite_lines(tmp_path / "audit.jsonl", tamper)
    problems = provenance.verify(tmp_path)
    assert any("line 1" in p and "altered" in p for p in problems), problems


def test_rehashed_tampered_record_breaks_the_chain(tmp_path):
    complete_run(tmp_path)

    def tamper(lines):  # an editor who also recomputes the record's own hash
        r = json.loads(lines[1])
        r["chunks_done"] = 3
        r["hash"] = provenance.record_hash(r)
        lines[1] = json.dumps(r, sort_keys=True, separators=(",", ":"))
        return lines

    rewrite_lines(tmp_path / "audit.jsonl", tamper)
    problems = provenance.verify(tmp_path)
    assert any("line 3" in p and "chain broken" in p for p in problems), problems


def test_deleted_middle_line_is_reported(tmp_path):
    complete_run(tmp_path)
    rewrite_lines(tmp_path / "audit.jsonl", lambda lines: lines[:1] + lines[2:])
    problems = provenance.verify(tmp_path)
    assert any("seq is 2, expected 1" in p for p in problems), problems
    assert any("chain broken" in p for p in problems), problems


def test_flipped_float_in_a_shard_is_reported(tmp_path):
    complete_run(tmp_path)
    with h5py.File(tmp_path / "shards" / "a002-r0001.h5", "r+") as f:
        ds = f["chunk_000003/C"]
        x = ds[()]
        x[5, 2] = np.nextafter(x[5, 2], 2.0)
        ds[...] = x
    problems = provenance.verify(tmp_path)
    assert any("result digest mismatch" in p for p in problems), problems
    assert any("chunk(s) 3 " in p for p in problems), problems


def test_job_text_and_audit_head_are_checked(tmp_path):
    path = complete_run(tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["job_toml"] = JOB.replace("seed = 7", "seed = 8")
    problems = provenance.verify(tmp_path)
    assert any("job_sha256 does not match the job text" in p for p in problems), problems

    tmp2 = tmp_path / "second"
    complete_run(tmp2, interrupted_first=False)
    provenance.append_record(tmp2, {"event": "start", "attempt": 9})
    problems = provenance.verify(tmp2)
    assert any("audit_head" in p for p in problems), problems


def test_missing_files_are_problems_not_tracebacks(tmp_path):
    assert any("audit.jsonl is missing" in p for p in provenance.verify(tmp_path / "nothing"))
    complete_run(tmp_path)
    (tmp_path / "shards" / "a002-r0000.h5").unlink()
    problems = provenance.verify(tmp_path)
    assert any("shard shards/a002-r0000.h5 is missing" in p for p in problems), problems
    assert any("result digest mismatch" in p for p in problems), problems
    (tmp_path / "RUN.h5").write_bytes(b"not hdf5")
    assert any("cannot be opened" in p for p in provenance.verify(tmp_path))
    (tmp_path / "RUN.h5").unlink()
    assert any("RUN.h5 is missing" in p for p in provenance.verify(tmp_path))


def test_unfinished_run_is_reported(tmp_path):
    provenance.append_record(tmp_path, {"event": "start", "attempt": 1, "job_sha256": JOB_SHA})
    provenance.append_record(tmp_path, {"event": "interrupted", "attempt": 1, "chunks_done": 0})
    problems = provenance.verify(tmp_path)
    assert problems == ["no 'complete' record: the run has not finished, its result cannot be audited"]


def test_append_after_a_torn_last_line(tmp_path):
    provenance.append_record(tmp_path, {"event": "start", "attempt": 1})
    with open(tmp_path / "audit.jsonl", "ab") as fh:
        fh.write(b'{"event":"interr')  # killed mid-append
    probs: list[str] = []
    provenance._check_chain(tmp_path / "audit.jsonl", probs)
    assert any("incomplete last line" in p for p in probs)
    provenance.append_record(tmp_path, {"event": "start", "attempt": 2, "n": np.int64(3)})
    probs = []
    recs = provenance._check_chain(tmp_path / "audit.jsonl", probs)
    assert probs == [] and [r["seq"] for r in recs] == [0, 1] and recs[1]["n"] == 3


def test_collect():
    p = provenance.collect(JOB, JOB_SHA, "numpy", "cpu", 4, 7)
    for k in ("package_version", "git_revision", "host", "python_version", "numpy_version", "h5py_version"):
        assert isinstance(p[k], str) and p[k]
    assert p["job_toml"] == JOB and p["job_sha256"] == JOB_SHA
    assert (p["backend"], p["device"], p["ranks"], p["seed"]) == ("numpy", "cpu", 4, 7)
    assert datetime.fromisoformat(p["start_time"].replace("Z", "+00:00")).tzinfo is not None


def test_git_revision(tmp_path):
    assert provenance.git_revision(tmp_path) == "unknown"  # not a checkout
    assert provenance.git_revision(tmp_path / "does-not-exist") == "unknown"
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    g = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false"]
    subprocess.run(g + ["init", "-q", str(tmp_path)], check=True)
    assert provenance.git_revision(tmp_path) == "unknown"  # no commit yet
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(g + ["-C", str(tmp_path), "add", "a.py"], check=True)
    subprocess.run(g + ["-C", str(tmp_path), "commit", "-q", "-m", "init"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert provenance.git_revision(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance.git_revision(tmp_path) == head + "-dirty"
