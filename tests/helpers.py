"""Shared fixtures: run the real `twin` CLI in subprocesses, under a real mpiexec when asked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
TWIN = [sys.executable, "-m", "engine.cli"]


def small_job(name="t", n=60, chunk=16, seed=7, extra="", arms=None, outputs=None, model="pk_2cmt",
              params="CL = 4.0\nV1 = 25.0\nQ = 8.0\nV2 = 60.0\nka = 1.1\nF = 0.7", solver=None, cohort=None):
    arms = arms or textwrap.dedent("""
        [[arms]]
        name = "A"
        [[arms.doses]]
        amount = 100.0
        route = "oral"
        interval = 12.0
        count = 4
        [[arms]]
        name = "B"
        [[arms.doses]]
        amount = 50.0
        route = "iv_infusion"
        duration = 2.0
        interval = 12.0
        count = 4
    """)
    outputs = outputs or 'times = { start = 0.0, stop = 48.0, step = 2.0 }\nvariables = ["C", "E"]\n' \
        '[[outputs.biomarkers]]\nname = "cmax"\nvariable = "C"\nstatistic = "max"\n'
    solver = solver or 'rtol = 1e-8\natol = 1e-10'
    cohort = cohort or textwrap.dedent(f"""
        size = {n}
        [cohort.covariates.weight]
        distribution = "lognormal"
        median = 70.0
        sd_log = 0.2
        unit = "kg"
        [cohort.covariates.sex]
        distribution = "categorical"
        categories = ["F", "M"]
        probabilities = [0.4, 0.6]
        [cohort.variability]
        parameters = ["CL", "V1", "ka"]
        omega = [[0.09, 0.0, 0.0], [0.0, 0.04, 0.0], [0.0, 0.0, 0.1]]
        [[cohort.covariate_effects]]
        parameter = "CL"
        covariate = "weight"
        model = "power"
        reference = 70.0
        exponent = 0.75
    """)
    return (f'[job]\nname = "{name}"\nseed = {seed}\nchunk_size = {chunk}\nbackend = "numpy"\n\n'
            f'[model]\nname = "{model}"\n[model.parameters]\n{params}\n\n[solver]\n{solver}\n\n'
            f'[cohort]\n{cohort}\n{arms}\n[outputs]\n{outputs}\n{extra}')


def run_twin(*args, cwd=None, env=None, timeout=300, check=False):
    e = {**os.environ, **(env or {})}
    e.setdefault("PYTHONUNBUFFERED", "1")
    p = subprocess.run([*TWIN, *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"twin {args} exited {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
    return p


def mpi_cmd(n: int, *args) -> list[str]:
    return [MPIEXEC, "-n", str(n), *TWIN, *map(str, args)]
