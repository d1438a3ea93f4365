"""A killed tissue run resumes and loses nothing (engine/tissue/checkpoint.py).

Real processes are killed (SIGKILL of the whole process group, 1 and 2 MPI ranks; SIGTERM), then
the same command is rerun and its RUN.h5 compared with an uninterrupted run's: maps, V traces and
point activation times bit for bit; the pseudo-ECG bit for bit on one rank and at 1e-12 relative
when ranks changed (a lead-field sum reduced in another order, as in tests/test_tissue_mpi.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.helpers import MPIEXEC, TWIN, mpi_cmd, run_twin
from tests.tissue_helpers import SLAB_JOB

ROOT = Path(__file__).resolve().parents[1]
TP06 = ROOT / "tests" / "data" / "cardiac" / "ten_tusscher_model_2006_epi.cellml"

# the slab of tests/test_tissue_mpi.py (oblique fibres: the halo carries cross terms), run long
# enough (4000 steps, ~5 s) to be killed half way; a checkpoint at every trace sample
JOB = (SLAB_JOB.replace('name = "tissue_mpi"', 'name = "tissue_resume"')
       .replace("end_time = 40.0", "end_time = 200.0\ncheckpoint_every_s = 0.0"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
KILL_AT_STEP = 1500  # of 4000


def _read(p: Path) -> dict:
    with h5py.File(p, "r") as f:
        return {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset) and f[k].dtype.kind in "fiub"}


def _stats(p: Path) -> dict:
    with h5py.File(p, "r") as f:
        return json.loads(f.attrs["stats"])


def _same(ref: dict, got: dict, ecg_rtol: float = 0.0) -> None:
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        if k == "ecg" and ecg_rtol:
            np.testing.assert_allclose(got[k], v, rtol=ecg_rtol, atol=ecg_rtol * np.abs(v).max())
        else:
            assert np.array_equal(got[k], v, equal_nan=True), k


def _cmd(ranks: int, job: Path, out: Path) -> list[str]:
    args = ("run", job, "-o", out, "-q")
    return [*TWIN, *map(str, args)] if ranks == 1 else mpi_cmd(ranks, *args)


def _checkpoint_steps(out: Path) -> int:
    try:
        with h5py.File(out / "checkpoint" / "state.h5", "r") as h:
            return int(h.attrs["steps"])
    except (OSError, KeyError):  # not written yet, or being replaced this instant
        return -1


def _start_and_kill(ranks: int, job: Path, out: Path, sig=signal.SIGKILL, until=None) -> tuple[int, str]:
    """Start `twin run`, wait until `until(out)` holds (default: a checkpoint past KILL_AT_STEP), send
    `sig` to the whole process group (mpiexec and every rank), and wait for it to end: (exit code,
    stderr)."""
    until = until or (lambda o: _checkpoint_steps(o) >= KILL_AT_STEP)
    p = subprocess.Popen(_cmd(ranks, job, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    t0 = time.monotonic()
    while not until(out):
        assert p.poll() is None, f"run ended before it could be interrupted: {p.communicate()}"
        assert time.monotonic() - t0 < 120, "no checkpoint within 120 s"
        time.sleep(0.01)
    if sig == signal.SIGKILL:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    return p.returncode, err


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    shutil.copy(TP06, d / TP06.name)
    job = d / "job.toml"
    job.write_text(JOB)
    run_twin("run", job, "-o", d / "ref", "-q", env={"OMP_NUM_THREADS": "1"}, check=True)
    ref = _read(d / "ref" / "RUN.h5")
    assert np.isfinite(ref["activation_time"][ref["mask"] == 1]).all()
    assert not (d / "ref" / "checkpoint").exists()  # removed once the result is written
    return d, job, ref


def _resumed(out: Path) -> float:
    s = _stats(out / "RUN.h5")
    assert s["steps"] == 4000
    return s["resumed_at_ms"]


def test_sigkill_one_rank_then_rerun_is_bit_identical(case):
    d, job, ref = case
    out = d / "k1"
    _start_and_kill(1, job, out)
    assert not (out / "RUN.h5").exists() and _checkpoint_steps(out) >= KILL_AT_STEP
    # the rerun may change how often checkpoints are taken and the [slurm] section: not the science
    job2 = d / "job_every_60s.toml"
    job2.write_text(JOB.replace("checkpoint_every_s = 0.0", "checkpoint_every_s = 60.0")
                    + '\n[slurm]\npartition = "other"\ntime = "01:00:00"\n')
    p = run_twin("run", job2, "-o", out, env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert "resumed from the checkpoint at t = " in p.stdout
    assert _resumed(out) >= KILL_AT_STEP * 0.05
    _same(ref, _read(out / "RUN.h5"))
    assert not (out / "checkpoint").exists()
    # a finished run rerun is a no-op that leaves the result as it was, and removes checkpoints a kill
    # between writing the result and clearing them would have left
    before = (out / "RUN.h5").stat().st_mtime_ns
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.h5").write_bytes(b"stale")
    p = run_twin("run", job, "-o", out)  # the original text: same science, so the same finished run
    assert p.returncode == 0 and "already complete" in p.stdout, p.stderr
    assert (out / "RUN.h5").stat().st_mtime_ns == before
    assert not (out / "checkpoint").exists()


@pytest.mark.mpi
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed")
@pytest.mark.parametrize("resume_ranks", [2, 1])
def test_sigkill_two_ranks_then_rerun_on_two_or_one_rank(case, resume_ranks):
    """The checkpoint holds the gathered global state, so any rank count resumes it."""
    d, job, ref = case
    out = d / f"k2_{resume_ranks}"
    _start_and_kill(2, job, out)
    p = subprocess.run(_cmd(resume_ranks, job, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert _resumed(out) >= KILL_AT_STEP * 0.05
    _same(ref, _read(out / "RUN.h5"), ecg_rtol=1e-12)


def test_sigterm_saves_a_checkpoint_and_exits_75(case):
    d, job, ref = case
    out = d / "term"
    job3 = d / "job_rare.toml"  # interval checkpoints never due: the one on disk is the SIGTERM's
    job3.write_text(JOB.replace("checkpoint_every_s = 0.0", "checkpoint_every_s = 3600.0"))
    started = lambda o: (o / ".lock").exists() and time.sleep(1.0) is None  # noqa: E731 - a second into the steps
    code, err = _start_and_kill(1, job3, out, sig=signal.SIGTERM, until=started)
    assert code == 75, err
    assert "rerun the same command to resume" in err
    k = _checkpoint_steps(out)
    assert 0 < k < 4000, k
    q = run_twin("run", job3, "-o", out, "-q", env={"OMP_NUM_THREADS": "1"})
    assert q.returncode == 0, q.stderr
    assert _resumed(out) == pytest.approx(k * 0.05)
    _same(ref, _read(out / "RUN.h5"))


def test_checkpoint_of_another_job_or_a_corrupt_one_is_refused(case):
    d, job, _ = case
    out = d / "wrong"
    _start_and_kill(1, job, out, until=lambda o: _checkpoint_steps(o) >= 100)
    other = d / "job_other.toml"
    other.write_text(JOB.replace("current = 50.0", "current = 60.0"))
    p = run_twin("run", other, "-o", out)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()[-1]
    assert "checkpoint of a different job" in err and str(out / "checkpoint" / "state.h5") in err, p.stderr
    # the same job text with an edited cell model file is another job too
    d2 = d / "edited_model"
    d2.mkdir(exist_ok=True)
    (d2 / "job.toml").write_text(JOB)
    cell = TP06.read_text()
    assert cell.count("14.838") >= 1  # g_Na
    (d2 / TP06.name).write_text(cell.replace("14.838", "14.9", 1))
    p = run_twin("run", d2 / "job.toml", "-o", out)
    assert p.returncode != 0 and "checkpoint of a different job" in p.stderr.strip().splitlines()[-1], p.stderr
    (out / "checkpoint" / "state.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    p = run_twin("run", job, "-o", out)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()[-1]
    assert "unreadable checkpoint" in err and "remove it to start over" in err, p.stderr


def test_killed_planning_job_keeps_finished_candidates(tmp_path):
    """jobs/tissue_reentry.toml (4 candidates, ~2.5 s each): killed once a candidate is saved, the
    rerun reuses the saved rows instead of recomputing them. Proof: a saved row is altered on disk
    before the rerun, and the alteration shows in the result; every other number equals the
    uninterrupted run's."""
    import xarray as xr

    job = ROOT / "jobs" / "tissue_reentry.toml"
    env = {"OMP_NUM_THREADS": "1"}
    run_twin("run", job, "-o", tmp_path / "ref", "-q", env=env, check=True)
    out = tmp_path / "k"
    saved = lambda o: any((o / "checkpoint" / "candidates").glob("0*.json"))  # noqa: E731
    _start_and_kill(1, job, out, until=saved)
    files = sorted((out / "checkpoint" / "candidates").glob("0*.json"))
    assert 1 <= len(files) < 4
    rec = json.loads(files[0].read_text())
    i = rec["index"]
    rec["row"]["max_activations"] = 99
    files[0].write_text(json.dumps(rec))
    run_twin("run", job, "-o", out, "-q", env=env, check=True)
    a = xr.open_dataset(tmp_path / "ref" / "RUN.h5", engine="h5netcdf").load()
    b = xr.open_dataset(out / "RUN.h5", engine="h5netcdf").load()
    names = [c["name"] for c in __import__("tomllib").loads(job.read_text())["tissue"]["planning"]["candidates"]]
    assert int(b["max_activations"].sel(candidate=names[i])) == 99
    b["max_activations"].loc[{"candidate": names[i]}] = a["max_activations"].sel(candidate=names[i])
    for v in ("rank", "total_activation_time", "activated_fraction", "reentry", "max_activations", "pulses"):
        assert np.array_equal(a[v].values, b[v].values, equal_nan=True), v
    assert not (out / "checkpoint").exists()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
