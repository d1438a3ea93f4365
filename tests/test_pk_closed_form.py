"""The engine's PK kernels against closed-form solutions, through a real `twin run`.

Tolerance: relative error ≤ 1e-8 wherever C > 1e-6·max(C), absolute ≤ 1e-8·max(C) elsewhere.
The solver runs at rtol 1e-12 / atol 1e-14 mg, so its own error is ~1e-11; the oracle is accurate
to ~1e-14 (tests/test_pk_analytic.py). 1e-8 leaves 1000× margin for platform differences while any
modelling mistake (dose timing, bioavailability, infusion end, a rate constant) shows as 1e-3 or
more. Below 1e-6·max(C) (before absorption starts) relative error only measures atol.
"""

from __future__ import annotations

import textwrap

import h5py
import numpy as np
import pytest

from engine.config import load_job
from engine.parallel import SerialComm
from engine.runner import run
from tests.helpers import small_job
from tests.reference.pk_analytic import concentration, expand_regimen

REGIMENS = {
    "bolus_1": dict(amount=100.0, route="iv_bolus", time=0.0),
    "bolus_n": dict(amount=100.0, route="iv_bolus", time=1.0, interval=12.0, count=5),
    "inf_1": dict(amount=80.0, route="iv_infusion", time=0.5, duration=2.5),
    "inf_n": dict(amount=80.0, route="iv_infusion", time=0.0, interval=8.0, count=6, duration=1.0),
    "oral_1": dict(amount=200.0, route="oral", time=0.0),
    "oral_n": dict(amount=200.0, route="oral", time=0.0, interval=12.0, count=5),
}


def _arms() -> str:
    out = []
    for name, d in REGIMENS.items():
        lines = [f"[[arms]]", f'name = "{name}"', "[[arms.doses]]"]
        for k, v in d.items():
            lines.append(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}")
        out.append("\n".join(lines))
    return "\n".join(out) + "\n"


COHORT = textwrap.dedent("""
    size = 48
    [cohort.variability]
    parameters = ["CL", "V1", "ka", "F"]
    omega = [[0.09, 0.02, 0.0, 0.0], [0.02, 0.04, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.01]]
""")
COHORT_2 = COHORT.replace('["CL", "V1", "ka", "F"]', '["CL", "V1", "Q", "V2", "ka"]').replace(
    "omega = [[0.09, 0.02, 0.0, 0.0], [0.02, 0.04, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.01]]",
    "omega = [[0.09, 0.02, 0, 0, 0], [0.02, 0.04, 0, 0, 0], [0, 0, 0.05, 0, 0], [0, 0, 0, 0.05, 0], [0, 0, 0, 0, 0.1]]")


@pytest.mark.parametrize("model", ["pk_1cmt", "pk_2cmt"])
def test_concentrations_match_closed_form(model, tmp_path, job_file):
    params = "CL = 4.0\nV1 = 25.0\nka = 1.3\nF = 0.7" + ("\nQ = 8.0\nV2 = 60.0" if model == "pk_2cmt" else "")
    text = small_job(name=model, model=model, params=params, chunk=10, arms=_arms(),
                     cohort=COHORT if model == "pk_1cmt" else COHORT_2, solver="rtol = 1e-12\natol = 1e-14",
                     outputs='times = { start = 0.0, stop = 72.0, step = 0.5 }\nvariables = ["C", "E"]\n')
    loaded = load_job(job_file(text))
    assert run(loaded, tmp_path / "run", SerialComm(), quiet=True) == 0
    with h5py.File(tmp_path / "run" / "RUN.h5", "r") as f:
        C, E = f["C"][:], f["E"][:]
        t = f["time"][:]
        arm = f["arm"][:]
        names = f["arm"].attrs["flag_meanings"].split()
        par = {k: f["cohort"][k][:] for k in ("CL", "V1", "Q", "V2", "ka", "F", "E0", "Emax", "EC50", "gamma")
               if k in f["cohort"]}
        assert (f["status"][:] == 0).all()
    seen = set()
    worst = 0.0
    for i in range(C.shape[0]):
        reg = REGIMENS[names[arm[i]]]
        seen.add(names[arm[i]])
        p = {k: float(v[i]) for k, v in par.items()}
        ref = concentration(model, p, expand_regimen(**reg), t)
        big = ref > 1e-6 * ref.max()
        rel = np.abs(C[i][big] / ref[big] - 1).max()
        worst = max(worst, rel)
        assert rel <= 1e-8, (i, names[arm[i]], rel)
        assert np.abs(C[i][~big] - ref[~big]).max(initial=0) <= 1e-8 * ref.max()
        # direct Emax effect from the same concentrations
        g = p["gamma"]
        e_ref = p["E0"] + p["Emax"] * ref**g / (p["EC50"] ** g + ref**g)
        np.testing.assert_allclose(E[i], e_ref, rtol=1e-8, atol=1e-8 * p["Emax"])
    assert seen == set(REGIMENS)  # every regimen was drawn at least once
    print(f"{model}: worst relative error {worst:.2e}")
