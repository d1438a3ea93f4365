"""`twin submit` / `twin status` on a real single-node Slurm (tests/slurm_cluster.py).

The cluster (munged, slurmctld, slurmd as root, config under a temporary directory; Debian's
slurm-wlm and munge installed with apt-get when missing) is started once for this module and
stopped by PID at the end. Tests that need it are skipped, with the reason printed, only when this
machine cannot run the daemons (not root, no apt, daemons refuse to start); set
TWIN_REQUIRE_SLURM=1 to make that a failure instead.

Ranks are launched by `srun --mpi=pmi2`: PyPI MPICH takes its rank, size and wire-up from Slurm's
PMI-2 server, no mpiexec. Bit-identity is checked on the raw bytes of every dataset in RUN.h5
against a local (serial, in-process) run of the same job file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from engine.submit import SbatchTemplate, placeholders, template_dir, time_seconds
from tests.helpers import TWIN, run_twin, small_job
from tests.slurm_cluster import ClusterUnavailable, SlurmCluster
from tests.test_mpi import SLOW, assert_same_arrays, journal_lines, reference, wait_for


# ------------------------------------------------------------------------------------ cluster
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    t0 = time.time()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as e:
        msg = f"cannot run a real Slurm on this machine: {e}"
        print(msg, file=sys.stderr)
        if os.environ.get("TWIN_REQUIRE_SLURM"):
            pytest.fail(msg)
        pytest.skip(msg)
    print(f"slurm test cluster up in {time.time() - t0:.1f} s ({cluster.root})", file=sys.stderr)
    yield cluster
    cluster.stop()


def clean_env(cluster: SlurmCluster) -> dict[str, str]:
    """The client environment without any SLURM_*/PMI_* of an enclosing job or launcher."""
    env = {k: v for k, v in cluster.env.items()
           if not (k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_", "MPI_")) and k != "SLURM_CONF")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def twin(cluster, *args, cwd=None, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([*TWIN, *map(str, args)], env=clean_env(cluster), cwd=cwd, capture_output=True, text=True,
                       timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"twin {args} exited {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
    return p


def submit(cluster, *args, cwd=None) -> int:
    p = twin(cluster, "submit", *args, cwd=cwd)
    m = re.search(r"as Slurm job (\d+)", p.stdout)
    assert m, p.stdout
    return int(m.group(1))


def outputs(run_dir: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')}" for f in sorted((run_dir / "slurm").glob("*.out")))


def finish(cluster, job_id: int, run_dir: Path, timeout=180) -> None:
    state = cluster.wait_job(job_id, timeout)
    assert state == "COMPLETED", f"job {job_id} ended {state}\n{outputs(run_dir)}\n" \
                                 f"slurmd: {cluster._log_tail('slurmd', 10)}"


def status(cluster, run_dir: Path) -> dict:
    return json.loads(twin(cluster, "status", run_dir, "--json").stdout)


def journal_entries(run_dir: Path) -> dict[int, dict]:
    out = {}
    for f in sorted((run_dir / "journal").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            e = json.loads(line)
            out.setdefault(e["chunk"], e)
    return out


def audit_events(run_dir: Path) -> list[str]:
    return [json.loads(l)["event"] for l in (run_dir / "audit.jsonl").read_text().splitlines()]


def poll(cond, timeout: float, what: str, every: float = 0.25) -> None:
    """wait_for, at a pace that does not flood slurmctld with scontrol/sinfo calls."""
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


_refs: dict[str, Path] = {}


def local_reference(tmp_path_factory, text: str) -> Path:
    """RUN.h5 of a serial in-process run of this job text (computed once per text)."""
    if text not in _refs:
        _refs[text] = reference(tmp_path_factory.mktemp("ref"), text)
    return _refs[text]


# ------------------------------------------------------------------------------------ on Slurm
@pytest.mark.slurm
def test_submit_mpi_job_equals_local_run(slurm, tmp_path, tmp_path_factory):
    text = small_job(name="sub", n=150, chunk=11)  # 14 chunks, ragged last
    job = tmp_path / "job.toml"
    job.write_text(text)
    out = tmp_path / "run"
    t0 = time.time()
    jid = submit(slurm, job, "--ntasks-per-node", "3", "--time", "00:10:00", "-o", out, cwd=tmp_path)
    ref = local_reference(tmp_path_factory, text)
    finish(slurm, jid, out)
    print(f"cpu MPI job on Slurm: {time.time() - t0:.1f} s", file=sys.stderr)
    script = (out / "slurm" / "cohort_mpi.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=3" in script and "srun --mpi=pmi2" in script
    assert_same_arrays(ref, out / "RUN.h5")
    with h5py.File(out / "RUN.h5", "r") as f:
        assert f.attrs["ranks"] == 3  # three ranks wired up through PMI-2
    assert len(list((out / "logs").glob("rank*.log"))) == 3
    st = status(slurm, out)
    assert (st["chunks"], st["done"], st["remaining"], st["attempts"]) == (14, 14, 0, 1)
    assert st["complete"] and st["last_audit"]["event"] == "complete"
    assert st["slurm"]["job_id"] == str(jid) and st["slurm"]["states"] == {"COMPLETED": 1}
    assert "14 done, 0 remaining" in twin(slurm, "status", out).stdout
    assert run_twin("audit", out).returncode == 0


@pytest.mark.slurm
def test_gpu_template_binds_one_gpu_per_rank(slurm, tmp_path, tmp_path_factory):
    if not slurm.gpus:
        pytest.skip(f"no (fake) GPUs in the test cluster: {slurm.no_gpu_reason}")
    # resources from the job's [slurm] section; the command line overrides the time only
    text = small_job(name="gpu", n=90, chunk=10) + '\n[slurm]\nnodes = 1\nntasks_per_node = 2\ngpus_per_task = 1\n' \
                                                   'time = "00:30:00"\npartition = "debug"\n'
    job = tmp_path / "job.toml"
    job.write_text(text)
    out = tmp_path / "run"
    jid = submit(slurm, job, "--time", "00:05:00", "-o", out, cwd=tmp_path)
    ref = local_reference(tmp_path_factory, text)
    finish(slurm, jid, out)
    script = (out / "slurm" / "cohort_gpu.sbatch").read_text()
    for line in ("#SBATCH --gpus-per-task=1", "#SBATCH --ntasks-per-node=2", "#SBATCH --time=00:05:00",
                 "#SBATCH --partition=debug"):
        assert line in script
    log = outputs(out)
    bound = dict(re.findall(r"twin: rank (\d+) .*CUDA_VISIBLE_DEVICES=(\S+)", log))
    assert sorted(bound) == ["0", "1"], log
    assert len(set(bound.values())) == 2 and all(v.isdigit() for v in bound.values()), log  # one GPU each
    m = re.search(r"CUPY_CACHE_DIR=(\S+) \(node-local\)", log)
    assert m and m.group(1).startswith(os.environ.get("TMPDIR", "/tmp")) and m.group(1).endswith(f"-{jid}")
    assert_same_arrays(ref, out / "RUN.h5")


@pytest.mark.slurm
def test_array_screen_one_task_per_shard(slurm, tmp_path, tmp_path_factory):
    texts = {f"lib{i}": small_job(name=f"lib{i}", n=40 + 10 * i, chunk=12, seed=100 + i) for i in range(3)}
    files = []
    for name, text in texts.items():
        (tmp_path / f"{name}.toml").write_text(text)
        files.append(tmp_path / f"{name}.toml")
    screen = tmp_path / "screen"
    t0 = time.time()
    jid = submit(slurm, *files, "--array-shards", "2", "--ntasks-per-node", "2", "--time", "10", "-o", screen,
                 cwd=tmp_path)
    refs = {name: local_reference(tmp_path_factory, text) for name, text in texts.items()}
    state = slurm.wait_job(jid, 180)
    assert state == "COMPLETED", f"{state}\n{outputs(screen)}"
    print(f"array screen (2 tasks, 3 jobs) on Slurm: {time.time() - t0:.1f} s", file=sys.stderr)
    log = outputs(screen)
    # shard 0 ran jobs 0 and 2, shard 1 ran job 1, each in its own array task
    assert re.search(r"array task 0: job 0 .*lib0", log) and re.search(r"array task 0: job 2 .*lib2", log)
    assert re.search(r"array task 1: job 1 .*lib1", log) and "array task 1: job 0" not in log
    assert len(list((screen / "slurm").glob("*.out"))) == 2
    for name in texts:
        assert_same_arrays(refs[name], screen / name / "RUN.h5")
    st = status(slurm, screen)
    assert st["screen"] and st["complete"] == 3 and st["done"] == st["chunks"] == 4 + 5 + 5
    assert st["slurm"]["states"] == {"COMPLETED": 2}


N_REQUEUE_CHUNKS = 24
REQUEUE_JOB = {**SLOW, "n": 6 * N_REQUEUE_CHUNKS, "chunk": 6}  # ~10-20 s on 2 ranks of a 2-core box


def _requeue_run(slurm, tmp_path, tmp_path_factory, interrupt) -> tuple[Path, int, int]:
    """Submit a ~20 s job with --requeue, interrupt it after a few chunks, let it come back, finish;
    the result must equal a local run byte for byte."""
    text = small_job(name="requeue", **REQUEUE_JOB)
    job = tmp_path / "job.toml"
    job.write_text(text)
    out = tmp_path / "run"
    t0 = time.time()
    jid = submit(slurm, job, "--requeue", "--ntasks-per-node", "2", "--time", "00:10:00", "-o", out, cwd=tmp_path)
    wait_for(lambda: journal_lines(out) >= 3, timeout=120, what="3 journaled chunks")
    interrupt(jid)

    def requeued():
        info = slurm.job_info(jid)
        return info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= 1

    poll(requeued, timeout=60, what="the job back in the queue")
    before = len(journal_entries(out))
    assert 3 <= before < N_REQUEUE_CHUNKS
    # Slurm holds a requeued job ~2 minutes before it may start again; a test need not wait that
    # long, but slurmd refuses to relaunch a job within the second it was killed (credentials are
    # revoked with 1 s resolution: "Job N already killed, do not launch batch job"), so let the
    # node finish with it first
    poll(slurm.node_idle, timeout=60, what="the node idle after the requeue")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], env=slurm.env, check=True)
    ref = local_reference(tmp_path_factory, text)
    finish(slurm, jid, out)
    print(f"requeued job on Slurm: {time.time() - t0:.1f} s (incl. reference)", file=sys.stderr)
    assert_same_arrays(ref, out / "RUN.h5")
    assert audit_events(out) == ["start", "interrupted", "start", "complete"]
    assert run_twin("audit", out).returncode == 0
    return out, jid, before


@pytest.mark.slurm
def test_scontrol_requeue_resumes_bit_identical(slurm, tmp_path, tmp_path_factory):
    out, jid, before = _requeue_run(
        slurm, tmp_path, tmp_path_factory,
        lambda jid: subprocess.run(["scontrol", "requeue", str(jid)], env=slurm.env, check=True))
    log = outputs(out)
    assert "DUE TO JOB REQUEUE" in log and "(restart 1)" in log
    # the chunks journaled before the requeue were not computed again
    st = status(slurm, out)
    entries = journal_entries(out)
    n = N_REQUEUE_CHUNKS
    assert (st["done"], st["remaining"], st["attempts"]) == (n, 0, 2) == (len(entries), 0, 2)
    assert st["chunks_by_attempt"] == {"1": before, "2": n - before}
    assert st["failed_patients"] == sum(e["n_failed"] for e in entries.values())
    assert st["slurm"]["states"] == {"COMPLETED": 1} and st["slurm"]["restarts"] == 1


@pytest.mark.slurm
def test_sigterm_before_time_limit_requeues_itself(slurm, tmp_path, tmp_path_factory):
    # --signal=TERM@N delivers SIGTERM to the job's steps (not the batch shell) N s before the
    # limit; `scancel --signal=TERM` delivers exactly that now, so the test need not wait for a limit
    out, jid, before = _requeue_run(
        slurm, tmp_path, tmp_path_factory,
        lambda jid: subprocess.run(["scancel", "--signal=TERM", str(jid)], env=slurm.env, check=True))
    script = (out / "slurm" / "cohort_requeue.sbatch").read_text()
    assert "#SBATCH --requeue" in script and re.search(r"#SBATCH --signal=TERM@\d+", script)
    log = outputs(out)
    assert "twin run exited 75" in log and f"requeueing job {jid}" in log and "(restart 1)" in log
    st = status(slurm, out)
    assert st["chunks_by_attempt"] == {"1": before, "2": N_REQUEUE_CHUNKS - before}
    assert st["slurm"]["restarts"] == 1


@pytest.mark.slurm
def test_tissue_job_sigterm_requeues_and_resumes_from_its_checkpoint(slurm, tmp_path):
    """A tissue job (the slab of the MPI tests, 6000 steps) on 2 ranks under srun with --requeue:
    SIGTERM once a checkpoint past step 1500 exists, the ranks save their state and exit 75, the
    script requeues the job, and the second start continues from the checkpoint. The result equals
    a local one-rank run: maps and traces bit for bit, the pseudo-ECG to 1e-12 relative (a
    lead-field sum over 2 ranks' voxels)."""
    import shutil

    import numpy as np

    from tests.tissue_helpers import SLAB_JOB

    tp06 = Path(__file__).parent / "data" / "cardiac" / "ten_tusscher_model_2006_epi.cellml"
    shutil.copy(tp06, tmp_path / tp06.name)
    job = tmp_path / "job.toml"
    job.write_text(SLAB_JOB.replace('name = "tissue_mpi"', 'name = "tissue_requeue"')
                   .replace("end_time = 40.0", "end_time = 300.0\ncheckpoint_every_s = 0.0"))
    out = tmp_path / "run"

    def steps() -> int:
        try:
            with h5py.File(out / "checkpoint" / "state.h5", "r") as h:
                return int(h.attrs["steps"])
        except (OSError, KeyError):
            return -1

    jid = submit(slurm, job, "--requeue", "--ntasks-per-node", "2", "--time", "00:10:00", "-o", out, cwd=tmp_path)
    poll(lambda: steps() >= 1500, timeout=120, what="a tissue checkpoint past step 1500", every=0.05)
    subprocess.run(["scancel", "--signal=TERM", str(jid)], env=slurm.env, check=True)

    def requeued():
        info = slurm.job_info(jid)
        return info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= 1

    poll(requeued, timeout=60, what="the job back in the queue")
    assert not (out / "RUN.h5").exists() and 1500 <= steps() < 6000
    poll(slurm.node_idle, timeout=60, what="the node idle after the requeue")
    time.sleep(2)  # see _requeue_run: slurmd will not relaunch a job within the second it was killed
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], env=slurm.env, check=True)
    run_twin("run", job, "-o", tmp_path / "ref", "-q", env={"OMP_NUM_THREADS": "1"}, check=True)
    finish(slurm, jid, out)
    log = outputs(out)
    assert "twin run exited 75" in log and f"requeueing job {jid}" in log and "(restart 1)" in log, log
    with h5py.File(out / "RUN.h5", "r") as f:
        stats = json.loads(f.attrs["stats"])
        got = {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset) and f[k].dtype.kind in "fiub"}
    assert stats["resumed_at_ms"] >= 1500 * 0.05 and stats["ranks"] == 2
    with h5py.File(tmp_path / "ref" / "RUN.h5", "r") as f:
        ref = {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset) and f[k].dtype.kind in "fiub"}
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        if k == "ecg":
            np.testing.assert_allclose(got[k], v, rtol=1e-12, atol=1e-12 * np.abs(v).max())
        else:
            assert np.array_equal(got[k], v, equal_nan=True), k
    assert not (out / "checkpoint").exists()


# ------------------------------------------------------------------------------------ no Slurm needed
def test_dry_run_renders_every_template(tmp_path, job_file):
    job = job_file(small_job(name="dry") + '\n[slurm]\nntasks_per_node = 4\ntime = "02:00:00"\naccount = "proj1"\n')
    job2 = job_file(small_job(name="dry2", seed=8), name="job2.toml")
    cases = {
        "cohort_mpi": [],
        "cohort_gpu": ["--gpus-per-task", "1", "--nodes", "2"],
        "cohort_requeue": ["--requeue", "--signal-seconds", "300"],
        "screen_array": [job2, "--array-parallel", "1"],
    }
    for name, extra in cases.items():
        p = run_twin("submit", job, *extra, "--dry-run", "-o", tmp_path / "r", "--partition", "p1", check=True)
        s = p.stdout
        assert f"from {name}.sbatch" in s
        assert not placeholders(s), placeholders(s)
        assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0
        heads = [l for l in s.splitlines() if l.startswith("#SBATCH")]
        assert "#SBATCH --account=proj1" in heads and "#SBATCH --partition=p1" in heads
        assert "#SBATCH --time=02:00:00" in heads  # from [slurm]
        assert ("#SBATCH --ntasks-per-node=4" in heads)
        if name == "cohort_gpu":
            assert "#SBATCH --nodes=2" in heads and "#SBATCH --gpus-per-task=1" in heads
            assert "CUPY_CACHE_DIR=" in s
        if name == "cohort_requeue":
            assert "#SBATCH --requeue" in heads and "#SBATCH --signal=TERM@300" in heads
        if name == "screen_array":
            assert "#SBATCH --array=0-1%1" in heads
        assert not (tmp_path / "r").exists()  # a dry run writes nothing
    # the command line wins over [slurm]
    s = run_twin("submit", job, "--time", "5", "--ntasks-per-node", "2", "--dry-run", check=True).stdout
    assert "#SBATCH --time=5\n" in s and "#SBATCH --ntasks-per-node=2\n" in s and "--signal=TERM@30" in s


def test_submit_refuses_bad_input(tmp_path, job_file):
    job = job_file(small_job(name="bad"))
    for args, words in [
        (["--time", "1:2:3:4"], "time"),
        (["--nodes", "0"], "--nodes"),
        (["--time", "00:01:00", "--signal-seconds", "60"], "not shorter"),
        (["-o", tmp_path / "a b"], "unquoted"),
        ([job, "--requeue"], "screen"),
        ([job], "job names must differ"),
        (["--array-shards", "3"], "between 1 and"),
    ]:
        p = run_twin("submit", job, *args, "--dry-run")  # job files first: argparse does not intermix
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
    bad = job_file(small_job(name="bad2") + '\n[slurm]\nqueue = "x"\n', name="bad2.toml")
    p = run_twin("validate", bad)
    assert p.returncode == 2 and "slurm.queue" in p.stderr
    # a run directory of another job is refused before anything reaches sbatch
    other = job_file(small_job(name="other", n=20, chunk=10), name="other.toml")
    assert run_twin("run", other, "-o", tmp_path / "o", "--quiet").returncode == 0
    p = run_twin("submit", job, "-o", tmp_path / "o")
    assert p.returncode == 2 and "holds another job" in p.stderr


def test_status_counts_come_from_the_journal(tmp_path, job_file):
    job = job_file(small_job(name="st", n=100, chunk=9))  # 12 chunks
    out = tmp_path / "run"
    assert run_twin("run", job, "-o", out, "--quiet").returncode == 0
    p = run_twin("status", out, "--json", check=True)
    st = json.loads(p.stdout)
    entries = journal_entries(out)
    assert (st["chunks"], st["done"], st["remaining"], st["attempts"]) == (12, len(entries), 0, 1)
    assert st["done_patients"] == 100 and st["complete"] and "slurm" not in st
    # an interrupted run: keep 5 journal lines (the state a kill leaves), no RUN.h5
    (j,) = (out / "journal").glob("*.jsonl")
    j.write_text("".join(j.read_text().splitlines(keepends=True)[:5]) + '{"chunk": 7, "sta')  # + a torn line
    (out / "RUN.h5").unlink()
    st = json.loads(run_twin("status", out, "--json", check=True).stdout)
    assert (st["done"], st["remaining"], st["complete"]) == (5, 7, False)
    text = run_twin("status", out, check=True)
    assert "5 done, 7 remaining of 12" in text.stdout and text.stderr == ""
    p = run_twin("status", tmp_path)
    assert p.returncode == 2 and "not a run directory" in p.stderr


def test_template_placeholders_are_lowercase_only():
    s = "a ${nodes} $SLURM_JOB_ID ${SLURM_X:-1} $((I % 2)) ${x_y}"
    assert placeholders(s) == {"nodes", "x_y"}
    assert SbatchTemplate(s).substitute(nodes=2, x_y="z") == "a 2 $SLURM_JOB_ID ${SLURM_X:-1} $((I % 2)) z"
    for f in template_dir().glob("*.sbatch"):
        assert placeholders(f.read_text()) <= {
            "job_name", "job", "run_dir", "twin", "nodes", "ntasks_per_node", "gpus_per_task", "cpus_per_task",
            "time", "signal_seconds", "directives", "max_requeues", "shards", "last_task", "array_limit"}, f
    assert [time_seconds(t) for t in ("30", "1:30", "01:00:00", "1-0", "2-01:30")] == [1800, 90, 3600, 86400, 178200]
