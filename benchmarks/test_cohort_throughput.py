"""Cohort throughput (patients/s) of `jobs/pk_example.toml` (2-cmt oral, 14 doses q12h, hourly
samples over 7 days) — engine vs a SciPy `solve_ivp` loop on the same patients, same tolerances.

    .venv/bin/python -m pytest benchmarks/test_cohort_throughput.py --benchmark-only

The SciPy peer is what a modeller writes by hand: one `solve_ivp` (RK45, the same Dormand–Prince
5(4) pair, same rtol/atol) per patient and dose interval, restarting at each dose. Both sides
first agree on the concentrations (checked below), so the comparison is like for like.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from engine.config import load_job
from engine.dosing import build_events
from engine.models import get_model
from engine.parallel import SerialComm
from engine.runner import compute_chunk, make_plan, run

JOB = Path(__file__).resolve().parents[1] / "jobs" / "pk_example.toml"
N_SCIPY = 100  # the loop is slow; patients/s is what is compared


@pytest.fixture(scope="module")
def plan():
    return make_plan(load_job(JOB))


def scipy_patient(p: dict, arm_doses, times, rtol, atol):
    """One patient with solve_ivp, restarting at every dose."""
    ka, CL, V1, Q, V2, F = (p[k] for k in ("ka", "CL", "V1", "Q", "V2", "F"))

    def f(t, y):
        return [-ka * y[0], ka * y[0] - (CL + Q) / V1 * y[1] + Q / V2 * y[2], Q / V1 * y[1] - Q / V2 * y[2]]

    dose_t = np.concatenate([d.times() for d in arm_doses])
    amt = np.concatenate([np.full(d.count, d.amount) for d in arm_doses])
    order = np.argsort(dose_t, kind="stable")
    dose_t, amt = dose_t[order], amt[order]
    bounds = list(dose_t) + [times[-1]]
    y = np.zeros(3)
    out = np.empty(len(times))
    for k in range(len(dose_t)):
        y[0] += F * amt[k]
        a, b = bounds[k], bounds[k + 1]
        sel = (times >= a) & ((times < b) if k + 1 < len(dose_t) else (times <= b))
        if b > a:
            sol = solve_ivp(f, (a, b), y, method="RK45", rtol=rtol, atol=atol, t_eval=times[sel], dense_output=False)
            out[sel] = sol.y[1] / V1
            y = sol.y[:, -1] if sol.t[-1] == b else solve_ivp(f, (a, b), y, rtol=rtol, atol=atol).y[:, -1]
    return out


def test_engine_numpy_chunk(benchmark, plan):
    """Kernel throughput: one 1000-patient chunk, no IO."""
    arrays = benchmark.pedantic(compute_chunk, args=(plan, 0), rounds=3, iterations=1)
    n = plan.layout.chunk_bounds(0)[1]
    benchmark.extra_info["patients_per_s"] = n / benchmark.stats.stats.mean
    assert (arrays["status"] == 0).all()


def test_engine_full_run(benchmark, tmp_path_factory):
    """End to end: 10,000 patients, cohort + kernel + HDF5 shards + master, one rank."""
    loaded = load_job(JOB)

    def go():
        d = tmp_path_factory.mktemp("run")
        assert run(loaded, d, SerialComm(), quiet=True) == 0

    benchmark.pedantic(go, rounds=1, iterations=1)
    benchmark.extra_info["patients_per_s"] = loaded.job.cohort.size / benchmark.stats.stats.mean


def test_scipy_solve_ivp_loop(benchmark, plan):
    """Peer: solve_ivp per patient on the first N_SCIPY patients of the same cohort."""
    job = plan.job
    ch = plan.cohort.chunk(0, N_SCIPY)
    model = get_model(job.model.name)
    times = plan.layout.time

    def go():
        out = np.empty((N_SCIPY, len(times)))
        for i in range(N_SCIPY):
            p = {k: ch.parameters[k][i] for k in model.parameter_names}
            out[i] = scipy_patient(p, job.arms[int(ch.arm[i])].doses, times, job.solver.rtol, job.solver.atol)
        return out

    out = benchmark.pedantic(go, rounds=1, iterations=1)
    benchmark.extra_info["patients_per_s"] = N_SCIPY / benchmark.stats.stats.mean
    # same answer as the engine (both at rtol 1e-8: agreement to ~1e-6 relative is expected)
    eng = compute_chunk(plan, 0)["C"][:N_SCIPY]
    big = eng > 1e-3 * eng.max()
    assert np.max(np.abs(out[big] / eng[big] - 1)) < 1e-5
