"""Real MPI ranks (`mpiexec -n K`), real kills, real signals.

Bit-identity is checked on raw bytes of every dataset in RUN.h5 (root, cohort/, biomarkers/).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from engine.config import load_job
from engine.errors import EXIT_INTERRUPTED
from engine.parallel import SerialComm
from engine.runner import run
from tests.helpers import MPIEXEC, mpi_cmd, run_twin, small_job

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed")]


def arrays(path: Path) -> dict[str, bytes]:
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.dtype.str, obj.shape, obj[()].tobytes())
        f.visititems(visit)
    return out


def assert_same_arrays(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    assert sorted(x) == sorted(y)
    diff = [k for k in x if x[k] != y[k]]
    assert not diff, f"datasets differ: {diff}"


def reference(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "ref.toml"
    p.write_text(text)
    assert run(load_job(p), tmp_path / "ref", SerialComm(), quiet=True) == 0
    return tmp_path / "ref" / "RUN.h5"


def journal_lines(run_dir: Path) -> int:
    d = run_dir / "journal"
    if not d.exists():
        return 0
    n = 0
    for f in d.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            try:
                json.loads(line)
                n += 1
            except ValueError:
                pass
    return n


def rank_pid(run_dir: Path, rank: int, attempt_logs_before: int = 0) -> int:
    log = run_dir / "logs" / f"rank{rank:04d}.log"
    for _ in range(600):
        if log.exists():
            pids = [int(l.split(" pid ")[1].split()[0]) for l in log.read_text().splitlines() if " pid " in l]
            if len(pids) > attempt_logs_before:
                return pids[-1]
        time.sleep(0.05)
    raise AssertionError(f"no pid logged for rank {rank}")


def wait_for(cond, timeout=120.0, what=""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_bit_identical_over_1_2_4_ranks(tmp_path, job_file, backend):
    text = small_job(name="ranks", n=150, chunk=11).replace('backend = "numpy"', f'backend = "{backend}"')  # 14 chunks, ragged last
    job = job_file(text)
    ref = reference(tmp_path, text)
    for k in (1, 2, 4):
        out = tmp_path / f"k{k}"
        p = subprocess.run(mpi_cmd(k, "run", job, "-o", out, "--quiet"), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert_same_arrays(ref, out / "RUN.h5")
        with h5py.File(out / "RUN.h5", "r") as f:
            assert f.attrs["ranks"] == k
        logs = list((out / "logs").glob("rank*.log"))
        assert len(logs) == k


SLOW = dict(n=360, chunk=12, solver="rtol = 1e-11\natol = 1e-13",
            outputs='times = { start = 0.0, stop = 96.0, step = 0.5 }\nvariables = ["C", "E"]\n')


@pytest.mark.parametrize("victim,after", [(1, 2), (0, 5)])
def test_sigkill_any_rank_then_resume_is_bit_identical(tmp_path, job_file, victim, after):
    text = small_job(name="kill", **SLOW)
    job = job_file(text)
    ref = reference(tmp_path, text)
    out = tmp_path / "run"
    proc = subprocess.Popen(mpi_cmd(2, "run", job, "-o", out, "--quiet"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        pid = rank_pid(out, victim)
        wait_for(lambda: journal_lines(out) >= after, what=f"{after} journaled chunks")
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)  # the launcher takes the other rank down: no hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not (out / "RUN.h5").exists()
    done_before = journal_lines(out)
    assert 0 < done_before < 30
    # resume with a different rank count: the chunks already done are not recomputed
    p = subprocess.run(mpi_cmd(2 if victim else 1, "run", job, "-o", out, "--quiet"), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert_same_arrays(ref, out / "RUN.h5")
    assert run_twin("audit", out).returncode == 0


def test_sigterm_flushes_and_exits_with_documented_code(tmp_path, job_file):
    text = small_job(name="term", **SLOW)
    job = job_file(text)
    ref = reference(tmp_path, text)
    out = tmp_path / "run"
    proc = subprocess.Popen([*mpi_cmd(2, "run", job, "-o", out, "--quiet")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids = [rank_pid(out, r) for r in (0, 1)]
    wait_for(lambda: journal_lines(out) >= 3, what="3 journaled chunks")
    t0 = time.time()
    for pid in pids:  # what Slurm does at the time limit: SIGTERM to every task
        os.kill(pid, signal.SIGTERM)
    proc.wait(timeout=30)
    elapsed = time.time() - t0
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr.read()
    assert elapsed < 30
    saved = journal_lines(out)
    assert 3 <= saved < 30
    # every journaled chunk is on disk and verified, so resuming only computes the rest
    p = run_twin("run", job, "-o", out, "--quiet", timeout=300)
    assert p.returncode == 0, p.stderr
    assert_same_arrays(ref, out / "RUN.h5")
    audit = [json.loads(l) for l in (out / "audit.jsonl").read_text().splitlines()]
    assert [r["event"] for r in audit] == ["start", "interrupted", "start", "complete"]


def test_sigterm_single_process(tmp_path, job_file):
    text = small_job(name="term1", **SLOW)
    job = job_file(text)
    out = tmp_path / "run"
    proc = subprocess.Popen(["python" if False else os.sys.executable, "-m", "engine.cli", "run", str(job), "-o",
                             str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank_pid(out, 0)
    wait_for(lambda: journal_lines(out) >= 2, what="2 journaled chunks")
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED
    assert time.time() - t0 < 30
    assert "rerun the same command to resume" in proc.stderr.read()
