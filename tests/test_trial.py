"""Trial design: screening, stratified randomisation (balanced, seed-stable, chunk-independent),
and subgroup summaries checked against pandas on the same file."""

from __future__ import annotations

import textwrap

import h5py
import numpy as np
import pandas as pd
import pytest

from engine.config import load_job
from engine.errors import JobError
from engine.parallel import SerialComm
from engine.runner import run
from engine.trial_analysis import forest_plot, subgroup_table
from tests.helpers import small_job

COHORT = textwrap.dedent("""
    size = {n}
    [cohort.covariates.age]
    distribution = "normal"
    mean = 50.0
    sd = 18.0
    unit = "year"
    [cohort.covariates.sex]
    distribution = "categorical"
    categories = ["F", "M"]
    probabilities = [0.45, 0.55]
    [cohort.covariates.weight]
    distribution = "lognormal"
    median = 75.0
    sd_log = 0.25
    unit = "kg"
    [cohort.variability]
    parameters = ["CL", "V1"]
    omega = [[0.09, 0.0], [0.0, 0.04]]
""")
ARMS = ('[[arms]]\nname = "low"\n[[arms.doses]]\namount = 50.0\nroute = "oral"\n'
        '[[arms]]\nname = "high"\nallocation = 2.0\n[[arms.doses]]\namount = 150.0\nroute = "oral"\n')
OUT = ('times = { start = 0.0, stop = 24.0, step = 2.0 }\nvariables = ["C"]\n'
       '[[outputs.biomarkers]]\nname = "cmax"\nvariable = "C"\nstatistic = "max"\n'
       '[[outputs.biomarkers]]\nname = "auc"\nvariable = "C"\nstatistic = "auc"\n')
TRIAL = textwrap.dedent("""
    [trial]
    randomisation = "stratified"
    strata = ["sex", "age"]
    block_size = 6
    primary = "cmax"
    reference_arm = "low"
    [[trial.inclusion]]
    covariate = "age"
    min = 18.0
    max = 80.0
    [[trial.exclusion]]
    covariate = "weight"
    min = 120.0
    [trial.subgroups]
    sex = true
    age = [18.0, 40.0, 65.0, 80.0]
""")


def _run(tmp_path, name, n=400, chunk=64, seed=11, trial=TRIAL, backend="cpu"):
    text = small_job(name=name, n=n, chunk=chunk, seed=seed, arms=ARMS, outputs=OUT, cohort=COHORT.format(n=n),
                     extra=trial).replace('backend = "numpy"', f'backend = "{backend}"')
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    assert run(load_job(p), tmp_path / name, SerialComm(), quiet=True) == 0
    return tmp_path / name / "RUN.h5"


def _read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in ("arm", "status", "cohort/age", "cohort/sex", "cohort/weight", "biomarkers/cmax",
                                     "biomarkers/auc")}


def test_screening_and_stratified_blocks(tmp_path):
    d = _read(_run(tmp_path, "a"))
    age, w, arm, st = d["cohort/age"], d["cohort/weight"], d["arm"], d["status"]
    eligible = (age >= 18) & (age <= 80) & ~(w >= 120)
    assert ((st == 6) == ~eligible).all() and (arm[~eligible] == -1).all()
    assert (arm[eligible] >= 0).all() and (st[eligible] == 0).all()
    assert np.isnan(d["biomarkers/cmax"][~eligible]).all()
    # permuted blocks of 6 (low:high = 1:2) within each sex x age-band stratum: every complete block
    # holds 2 low and 4 high, so per stratum |n_high - 2 n_low| <= 4 (one incomplete block)
    band = np.searchsorted([18.0, 40.0, 65.0, 80.0], age, side="right") - 1
    for s in (0, 1):
        for b in range(3):
            m = eligible & (d["cohort/sex"] == s) & (np.minimum(band, 2) == b)
            n_low, n_high = (arm[m] == 0).sum(), (arm[m] == 1).sum()
            assert abs(n_high - 2 * n_low) <= 4, (s, b, n_low, n_high)
    overall = (arm[eligible] == 1).mean()
    assert abs(overall - 2 / 3) < 0.03


def test_randomisation_is_seed_stable_and_chunk_independent(tmp_path):
    a = _read(_run(tmp_path, "c64", chunk=64))["arm"]
    b = _read(_run(tmp_path, "c7", chunk=7))["arm"]
    c = _read(_run(tmp_path, "again", chunk=64))["arm"]
    other = _read(_run(tmp_path, "seed2", seed=12))["arm"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert (a != other).any()


def test_subgroup_summary_equals_pandas(tmp_path):
    path = _run(tmp_path, "sg")
    df = subgroup_table(path)
    d = _read(path)
    pdf = pd.DataFrame({"arm": d["arm"], "ok": d["status"] == 0, "sex": d["cohort/sex"], "age": d["cohort/age"],
                        "cmax": d["biomarkers/cmax"]})
    pdf = pdf[pdf.ok & pdf.cmax.notna()]
    pdf["arm_name"] = pdf.arm.map({0: "low", 1: "high"})
    pdf["age_band"] = pd.cut(pdf.age, [18.0, 40.0, 65.0, 80.0], right=False, labels=["age 18–40", "age 40–65", "age 65–80"])
    pdf.loc[pdf.age == 80.0, "age_band"] = "age 65–80"
    checks = {"all patients": pdf}
    checks.update({f"sex={lab}": pdf[pdf.sex == c] for c, lab in ((0, "F"), (1, "M"))})
    checks.update({str(b): pdf[pdf.age_band == b] for b in ["age 18–40", "age 40–65", "age 65–80"]})
    for level, sub in checks.items():
        g = sub.groupby("arm_name").cmax
        for armn in ("low", "high"):
            r = df[(df.level == level) & (df.arm == armn)].iloc[0]
            assert r["n"] == g.count()[armn]
            np.testing.assert_allclose(r["mean"], g.mean()[armn], rtol=1e-12)
            np.testing.assert_allclose(r["sd"], g.std()[armn], rtol=1e-9)
        h, lo = sub[sub.arm_name == "high"].cmax, sub[sub.arm_name == "low"].cmax
        r = df[(df.level == level) & (df.arm == "high")].iloc[0]
        np.testing.assert_allclose(r.diff_vs_ref, h.mean() - lo.mean(), rtol=1e-12)
        se = np.sqrt(h.var() / len(h) + lo.var() / len(lo))
        np.testing.assert_allclose(r.ci_high - r.ci_low, 2 * 1.959963984540054 * se, rtol=1e-9)
    # the high dose gives about three times the Cmax of the low dose (linear PK)
    assert df[(df.level == "all patients") & (df.arm == "high")].iloc[0].diff_vs_ref > 0
    pngs = forest_plot(path, tmp_path)
    assert pngs and pngs[0].stat().st_size > 5000


@pytest.mark.parametrize("bad,needle", [
    ('randomisation = "stratified"\nstrata = ["bmi"]\n', "trial.strata[0] = 'bmi'"),
    ('randomisation = "stratified"\nstrata = ["age"]\n', "band edges in trial.subgroups.age"),
    ('primary = "tmax"\n', "trial.primary = 'tmax'"),
    ('reference_arm = "placebo"\n', "trial.reference_arm = 'placebo'"),
    ('randomisation = "stratified"\nstrata = ["sex"]\nblock_size = 4\n', "block_size"),
])
def test_bad_trial_sections(tmp_path, bad, needle):
    p = tmp_path / "j.toml"
    p.write_text(small_job(arms=ARMS, outputs=OUT, cohort=COHORT.format(n=20), extra="[trial]\n" + bad))
    with pytest.raises(JobError) as e:
        from engine.runner import make_plan

        make_plan(load_job(p))
    assert needle in str(e.value)
