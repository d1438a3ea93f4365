"""End-to-end jobs: `twin run` of a benchmark job in this process, and over MPI ranks.

The benchmark job is the shape of jobs/pk_example.toml (2-cmt oral PK + Emax, covariates with
allometric effects, two arms of 14 doses q12h, 169 hourly samples of C and E, biomarkers),
with the cohort size, chunk size and backend set by the suite.

Scaling runs `LAUNCHER -n K python -m engine.cli run JOB` as a subprocess for each K, with
OMP_NUM_THREADS = threads per rank (1 by default, so K ranks use K cores):
  strong: fixed cohort, efficiency T1 / (K · TK);   weak: cohort ∝ K, efficiency T1 / TK.
T is the run's own timing, read from its rank logs (first "attempt" line to the last "chunk …
done" line over all ranks: cohort + kernel + shard writes, without interpreter start-up, MPI
launch and the master file); the subprocess wall time is reported beside it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from . import flops as fl

JOB_TEMPLATE = """\
# written by `twin bench`: the shape of jobs/pk_example.toml
[job]
name = "{name}"
seed = 20261122
chunk_size = {chunk}
backend = "{backend}"

[model]
name = "pk_2cmt"
[model.parameters]
CL = 4.0
V1 = 25.0
Q = 8.0
V2 = 60.0
ka = 1.1
F = 0.7
E0 = 0.0
Emax = 100.0
EC50 = 1.5
gamma = 1.5

[solver]
method = "dopri5"
rtol = 1e-8
atol = 1e-9

[cohort]
size = {n}
[cohort.covariates.age]
distribution = "normal"
mean = 52.0
sd = 14.0
low = 18.0
high = 85.0
unit = "year"
[cohort.covariates.sex]
distribution = "categorical"
categories = ["F", "M"]
probabilities = [0.5, 0.5]
[cohort.covariates.weight]
distribution = "lognormal"
median = 75.0
sd_log = 0.18
low = 40.0
high = 160.0
unit = "kg"
[cohort.variability]
parameters = ["CL", "V1", "Q", "V2", "ka", "EC50"]
omega = [[0.09, 0.03, 0.0, 0.0, 0.0, 0.0],
         [0.03, 0.04, 0.0, 0.0, 0.0, 0.0],
         [0.0, 0.0, 0.06, 0.0, 0.0, 0.0],
         [0.0, 0.0, 0.0, 0.05, 0.0, 0.0],
         [0.0, 0.0, 0.0, 0.0, 0.16, 0.0],
         [0.0, 0.0, 0.0, 0.0, 0.0, 0.10]]
[[cohort.covariate_effects]]
parameter = "CL"
covariate = "weight"
model = "power"
reference = 70.0
exponent = 0.75
[[cohort.covariate_effects]]
parameter = "V1"
covariate = "weight"
model = "power"
reference = 70.0
exponent = 1.0

[[arms]]
name = "100mg_q12h"
[[arms.doses]]
amount = 100.0
route = "oral"
interval = 12.0
count = 14
[[arms]]
name = "200mg_q12h"
[[arms.doses]]
amount = 200.0
route = "oral"
interval = 12.0
count = 14

[outputs]
times = {{ start = 0.0, stop = 168.0, step = 1.0 }}
variables = ["C", "E"]
[[outputs.biomarkers]]
name = "cmax"
variable = "C"
statistic = "max"
[[outputs.biomarkers]]
name = "auc_0_168"
variable = "C"
statistic = "auc"
"""

TITLE = "pk_example-shaped job: 2-cmt oral PK + Emax, 2 arms × 14 doses, 169 samples of C, E"


def write_job(path: Path, n: int, chunk: int, backend: str, name: str = "bench_pk") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(JOB_TEMPLATE.format(name=name, n=n, chunk=chunk, backend=backend))
    return path


def job_backend(requested: str) -> str:
    """The backend the job files use: what the kernels section times, else what auto gives."""
    from ..backend import resolve

    return resolve(requested).name


def flops_per_patient(job_path: Path, n_count: int) -> dict:
    """Counted flops per patient of the job: NumPy reference on its first `n_count` patients."""
    from ..backend import resolve
    from ..config import load_job
    from ..models import job_model
    from ..runner import compute_chunk, make_plan

    loaded = load_job(job_path)
    plan = make_plan(loaded)
    plan = replace(plan, backend=resolve("numpy"), layout=replace(plan.layout, chunk_size=n_count))
    with fl.count_rhs_evaluations() as cnt:
        compute_chunk(plan, 0)
    return fl.flops_per_patient(job_model(loaded), loaded.job.solver.method, cnt["evals"], n_count)


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def end_to_end(work: Path, n: int, chunk: int, backend: str, threads: int, n_count: int) -> dict:
    """`twin run` of the benchmark job in this process (one rank), timed around `run`."""
    from ..config import load_job
    from ..parallel import SerialComm
    from ..runner import run

    job = write_job(work / "e2e.toml", n, chunk, backend)
    d = work / "e2e_run"
    shutil.rmtree(d, ignore_errors=True)
    loaded = load_job(job)
    w0, c0 = time.perf_counter(), time.process_time()
    code = run(loaded, d, SerialComm(), quiet=True)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    if code != 0:
        raise RuntimeError(f"benchmark job exited {code}")
    fpp = flops_per_patient(job, n_count)
    nbytes = _dir_bytes(d / "shards")
    shutil.rmtree(d, ignore_errors=True)
    return {"title": TITLE, "n": n, "chunk_size": chunk, "backend": backend, "threads": threads,
            "wall_s": wall, "cpu_s": cpu, "throughput": n / wall, "unit": "patients/s",
            "shard_bytes": nbytes, "write_mbs": nbytes / wall / 1e6,
            "flops_per_patient": fpp["flops_per_patient"], "gflops": fpp["flops_per_patient"] * n / wall / 1e9,
            "counting": fpp, "what": "cohort + kernel + HDF5 shards + journal + master RUN.h5, 1 process"}


# ---------------------------------------------------------------- MPI scaling
_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO (.*)$")


def run_phase_seconds(run_dir: Path) -> float | None:
    """First 'attempt' line to last 'chunk … done' line over all rank logs (ms resolution)."""
    start = end = None
    for f in sorted((run_dir / "logs").glob("rank*.log")):
        for line in f.read_text(errors="replace").splitlines():
            m = _TS.match(line)
            if not m:
                continue
            ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if m.group(2).startswith("attempt "):
                start = ts if start is None else min(start, ts)
            elif m.group(2).startswith("chunk ") and " done " in m.group(2):
                end = ts if end is None else max(end, ts)
    return end - start if start is not None and end is not None else None


def find_launcher() -> str | None:
    exe = Path(sys.executable).parent
    return shutil.which("mpiexec", path=str(exe)) or shutil.which("mpiexec") or shutil.which("mpirun")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _launch(launcher: str, k: int, job: Path, out: Path, threads: int, timeout: float) -> dict:
    cmd = [*shlex.split(launcher.replace("{n}", str(k)))]
    if "{n}" not in launcher:
        cmd += ["-n", str(k)]
    cmd += [sys.executable, "-m", "engine.cli", "run", str(job), "-o", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-2000:]}")
    # recorded with executables by name: the record is shared, the machine's paths are not
    shown = [os.path.basename(c) if os.path.isabs(c) and os.access(c, os.X_OK) else c for c in cmd]
    return {"command": " ".join(shlex.quote(c) for c in shown), "subprocess_wall_s": wall,
            "run_phase_s": run_phase_seconds(out)}


def scaling(work: Path, ranks: list[int], strong_n: int, weak_per_rank: int, chunk: int, backend: str,
            threads_per_rank: int, launcher: str | None, reps: int, log, timeout: float = 1800) -> dict:
    launcher = launcher or find_launcher()
    cores = usable_cores()
    res: dict = {"launcher": os.path.basename(launcher) if os.path.isabs(launcher) else launcher, "ranks": ranks, "threads_per_rank": threads_per_rank,
                 "local_cores": cores, "backend": backend, "chunk_size": chunk, "job": TITLE,
                 "timing": "run phase from the rank logs (first 'attempt' to last 'chunk done'); "
                           "subprocess wall includes interpreter start-up, MPI launch and the master file",
                 "strong": [], "weak": []}
    if launcher is None:
        res["skipped"] = "no mpiexec found"
        return res
    cache: dict[tuple[int, int], dict] = {}

    def measure(k: int, n: int) -> dict:
        if (k, n) not in cache:
            job = write_job(work / f"scale_n{n}.toml", n, chunk, backend)
            runs = []
            for r in range(reps):
                log(f"scaling: {launcher} -n {k}, {n} patients (rep {r + 1}/{reps})")
                runs.append(_launch(launcher, k, job, work / f"scale_k{k}_n{n}", threads_per_rank, timeout))
            best = min(runs, key=lambda x: x["run_phase_s"] if x["run_phase_s"] is not None else x["subprocess_wall_s"])
            best = {**best, "subprocess_wall_s": min(x["subprocess_wall_s"] for x in runs), "reps": reps}
            shutil.rmtree(work / f"scale_k{k}_n{n}", ignore_errors=True)
            cache[(k, n)] = best
        return cache[(k, n)]

    for kind in ("weak", "strong"):
        base = None
        for k in ranks:
            n = weak_per_rank * k if kind == "weak" else strong_n
            m = measure(k, n)
            t = m["run_phase_s"] if m["run_phase_s"] is not None else m["subprocess_wall_s"]
            tw = m["subprocess_wall_s"]
            if base is None:
                base = (k, t, tw)
            k0, t1, tw1 = base
            if kind == "weak":
                eff, eff_w = t1 / t, tw1 / tw
            else:
                eff, eff_w = (t1 * k0) / (k * t), (tw1 * k0) / (k * tw)
            res[kind].append({"ranks": k, "patients": n, "cores_used": min(k * threads_per_rank, cores),
                              "oversubscribed": k * threads_per_rank > cores, **m,
                              "throughput": n / t, "efficiency": eff, "efficiency_subprocess_wall": eff_w})
    return res
