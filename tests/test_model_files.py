"""Models declared in TOML, or imported from SBML, run through `twin run` like library models."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy.integrate import solve_ivp

from engine.config import load_job
from engine.errors import JobError
from engine.parallel import SerialComm
from engine.runner import run
from tests.helpers import run_twin, small_job

DATA = Path(__file__).parent / "data"


def _job(tmp_path, model_file: Path, name: str, params: str, arms: str, outputs: str, cohort: str, backend="numpy"):
    shutil.copy(model_file, tmp_path / model_file.name)
    t = small_job(name="mf", model=name, params=params, arms=arms, outputs=outputs, cohort=cohort,
                  solver="rtol = 1e-10\natol = 1e-12")
    t = t.replace(f'name = "{name}"', f'name = "{name}"\nfile = "{model_file.name}"').replace(
        'backend = "numpy"', f'backend = "{backend}"')
    p = tmp_path / "job.toml"
    p.write_text(t)
    return p


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_toml_model_runs_and_matches_solve_ivp(tmp_path, backend):
    job = _job(tmp_path, DATA / "models" / "kpd_turnover.toml", "kpd_turnover", "kde = 0.3",
               '[[arms]]\nname = "A"\n[[arms.doses]]\namount = 100.0\nroute = "iv_bolus"\ntime = 2.0\n',
               'times = { start = 0.0, stop = 48.0, step = 2.0 }\nvariables = ["R_out"]\n',
               'size = 12\n[cohort.variability]\nparameters = ["kde", "kin"]\nomega = [[0.1, 0.0], [0.0, 0.05]]\n',
               backend)
    assert run(load_job(job), tmp_path / "run", SerialComm(), quiet=True) == 0
    with h5py.File(tmp_path / "run" / "RUN.h5", "r") as f:
        R, t = f["R_out"][:], f["time"][:]
        kde, kin, kout, id50 = (f["cohort"][k][:] for k in ("kde", "kin", "kout", "ID50"))
        assert f.attrs["model"] == "kpd_turnover"
    for i in range(len(R)):
        def rhs(_t, y):
            return [-kde[i] * y[0], kin[i] * (1 - y[0] / (id50[i] + y[0])) - kout[i] * y[1]]
        r0 = kin[i] / kout[i]
        a = solve_ivp(rhs, (0, 2), [0, r0], rtol=1e-12, atol=1e-14, t_eval=t[t <= 2]).y[1]
        b = solve_ivp(rhs, (2, 48), [100.0, a[-1] if t[t <= 2][-1] == 2 else r0], rtol=1e-12, atol=1e-14,
                      t_eval=t[t >= 2]).y[1]
        ref = np.concatenate([a, b[1:]])
        np.testing.assert_allclose(R[i], ref, rtol=1e-8)


def test_sbml_model_runs_through_a_job(tmp_path):
    case = DATA / "sbml" / "cases" / "00001"
    job = _job(tmp_path, case / "00001-sbml-l3v2.xml", "case00001", "k1 = 1.0",
               '[[arms]]\nname = "A"\n', 'times = { start = 0.0, stop = 5.0, step = 0.1 }\nvariables = ["S1_amount", "S2_amount"]\n',
               "size = 3\n")
    assert run(load_job(job), tmp_path / "run", SerialComm(), quiet=True) == 0
    ref = pd.read_csv(case / "00001-results.csv")
    with h5py.File(tmp_path / "run" / "RUN.h5", "r") as f:
        for s in ("S1", "S2"):
            got = f[f"{s}_amount"][0]
            # the suite's own criterion for this case: |x - ref| <= 1e-7 + 1e-4 |ref|
            assert np.all(np.abs(got - ref[s].to_numpy()) <= 1e-7 + 1e-4 * np.abs(ref[s].to_numpy()))


@pytest.mark.parametrize("content,needle", [
    ("[model]\nname = 'x'\n[states.a]\ninit = 0\n[derivatives]\na = '__import__(\"os\")'\n", "only calls to"),
    ("[model]\nname = 'kpd_turnover'\n[states.a]\ninit = 0\n[derivatives]\na = '-a'\nbogus = 1\n", "derivatives"),
    ("[model]\nname = 'kpd_turnover'\n[stats.a]\ninit = 0\n", "unknown key"),
    ("[model\nname = 'x'\n", "malformed TOML"),
    ("[model]\nname = 'other'\n[states.a]\ninit = 0\n[derivatives]\na = '-a'\n", "declares 'other'"),
])
def test_bad_model_files_are_one_line_job_errors(tmp_path, content, needle):
    (tmp_path / "m.toml").write_text(content)
    t = small_job(model="kpd_turnover", params="", arms='[[arms]]\nname = "A"\n',
                  outputs='times = [0.0, 1.0]\nvariables = ["a"]\n', cohort="size = 2\n")
    t = t.replace('name = "kpd_turnover"', 'name = "kpd_turnover"\nfile = "m.toml"')
    (tmp_path / "job.toml").write_text(t)
    with pytest.raises(JobError, match=needle):
        load_job(tmp_path / "job.toml")
    p = run_twin("validate", tmp_path / "job.toml")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "key 'model." in p.stderr


def test_unsupported_sbml_feature_is_named(tmp_path):
    support = (DATA / "sbml" / "SUPPORT.md").read_text().splitlines()
    case = next(l.split("|")[1].strip() for l in support if "events" in l and l.startswith("|") and "unsupported" in l)
    xml = next((DATA / "sbml" / "cases" / case).glob("*.xml"))
    t = small_job(model="m", params="", arms='[[arms]]\nname = "A"\n', outputs='times = [0.0, 1.0]\nvariables = ["x"]\n',
                  cohort="size = 2\n").replace('name = "m"', f'name = "m"\nfile = "{xml}"')
    (tmp_path / "job.toml").write_text(t)
    with pytest.raises(JobError, match="unsupported SBML feature: events"):
        load_job(tmp_path / "job.toml")
