"""Bad input through the real `twin` CLI: every user error is exit 2 and ONE line on stderr,
`twin: error: ...`, naming the offending key (dotted path) or file/column/line and the bad value,
never a traceback; per-patient problems are exit 0 with the patient's status code in RUN.h5.

Validation-only cases call `engine.cli.main([...])` in-process (the same code path as the
`twin` script: argparse, dispatch, the TwinError -> one line handler) with capsys; cases that
simulate, resume, audit or could execute something run `twin` in a subprocess (`run_twin`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import signal
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from engine.cli import main
from engine.layout import STATUS_CODES

from .helpers import run_twin

# ----------------------------------------------------------------------------------- base job
# Small and valid: 12 patients, 3 continuous covariates in a copula, one categorical, IIV on
# two parameters, an oral and an infusion arm, 6 sample times, two biomarkers.
BASE = textwrap.dedent("""\
    [job]
    name = "bad_input"
    seed = 7
    chunk_size = 8
    backend = "numpy"

    [model]
    name = "pk_1cmt"
    [model.parameters]
    CL = 4.0
    V1 = 25.0
    ka = 1.1

    [solver]
    rtol = 1e-6
    atol = 1e-8

    [cohort]
    size = 12

    [cohort.covariates.age]
    distribution = "normal"
    mean = 50.0
    sd = 10.0
    low = 18.0
    high = 90.0
    unit = "year"

    [cohort.covariates.weight]
    distribution = "lognormal"
    median = 70.0
    sd_log = 0.2
    unit = "kg"

    [cohort.covariates.crcl]
    distribution = "lognormal"
    median = 95.0
    sd_log = 0.3
    unit = "mL/min"

    [cohort.covariates.sex]
    distribution = "categorical"
    categories = ["F", "M"]
    probabilities = [0.5, 0.5]

    [cohort.correlation]
    variables = ["age", "weight", "crcl"]
    matrix = [[1.0, 0.1, -0.5], [0.1, 1.0, 0.3], [-0.5, 0.3, 1.0]]

    [cohort.variability]
    parameters = ["CL", "V1"]
    omega = [[0.09, 0.0], [0.0, 0.04]]

    [[cohort.covariate_effects]]
    parameter = "CL"
    covariate = "weight"
    model = "power"
    reference = 70.0
    exponent = 0.75

    [[arms]]
    name = "oral"
    [[arms.doses]]
    amount = 100.0
    route = "oral"
    interval = 12.0
    count = 2

    [[arms]]
    name = "infusion"
    [[arms.doses]]
    amount = 50.0
    route = "iv_infusion"
    duration = 1.0

    [outputs]
    times = [0.0, 1.0, 2.0, 6.0, 12.0, 24.0]
    variables = ["C", "E"]

    [[outputs.biomarkers]]
    name = "cmax"
    variable = "C"
    statistic = "max"

    [[outputs.biomarkers]]
    name = "auc"
    variable = "C"
    statistic = "auc"
""")


def edit(text: str, *subs: tuple[str, str]) -> str:
    """Apply exact, unique text substitutions (a typo in a case fails loudly, not silently)."""
    for old, new in subs:
        assert text.count(old) == 1, f"substitution target not unique/present: {old!r}"
        text = text.replace(old, new)
    return text


def job(*subs: tuple[str, str]) -> str:
    return edit(BASE, *subs)


AGE = 'distribution = "normal"\nmean = 50.0\nsd = 10.0\nlow = 18.0\nhigh = 90.0\n'
CORR_M = "matrix = [[1.0, 0.1, -0.5], [0.1, 1.0, 0.3], [-0.5, 0.3, 1.0]]"
CORR_V = 'variables = ["age", "weight", "crcl"]'
OMEGA = "omega = [[0.09, 0.0], [0.0, 0.04]]"
ORAL_DOSE = 'amount = 100.0\nroute = "oral"\ninterval = 12.0\ncount = 2\n'
INF_DOSE = 'amount = 50.0\nroute = "iv_infusion"\nduration = 1.0\n'
SEX_P = "probabilities = [0.5, 0.5]"
BM_AUC = 'name = "auc"\nvariable = "C"\nstatistic = "auc"\n'


def test_base_job_is_valid(tmp_path, capsys):
    """The cases below are one defect away from this job, which must validate cleanly."""
    p = tmp_path / "job.toml"
    p.write_text(BASE)
    assert main(["validate", str(p)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------- asserts
def assert_one_line_error(rc: int, err: str, must: list[str], code: int = 2) -> str:
    """rc == code; stderr is exactly one `twin: error: ...` line containing every `must` string."""
    assert "Traceback" not in err, f"traceback for a user error:\n{err}"
    assert rc == code, f"exit {rc}, want {code}; stderr:\n{err}"
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr must be one line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("twin: error: "), line
    missing = [m for m in must if m not in line]
    assert not missing, f"message lacks {missing}: {line}"
    assert "<root>" not in line, f"message names no key: {line}"
    return line


# ----------------------------------------------------------------------------------- job files
# (id, job text, substrings the message must contain). `{job}` in a substring is the job path.
JOB_CASES = [
    # --- TOML syntax
    ("toml_syntax_error", job(("seed = 7\n", "seed = = 7\n")), ["{job}", "malformed TOML", "line 3"]),
    ("toml_duplicate_key", job(("seed = 7\n", "seed = 7\nseed = 8\n")), ["{job}", "malformed TOML", "line 4"]),
    ("toml_unclosed_table", job(("[solver]\n", "[solver\n")), ["{job}", "malformed TOML", "line 14"]),
    ("toml_duplicate_table", job(("[solver]\n", "[job]\nx = 1\n[solver]\n")), ["{job}", "malformed TOML"]),
    # --- unknown / missing keys
    ("unknown_top_level_key", job(("[solver]\n", "[simulation]\nsteps = 3\n\n[solver]\n")),
     ["unknown key 'simulation'"]),
    ("unknown_nested_key_typo_sdd", job((AGE, AGE.replace("sd = 10.0", "sdd = 10.0"))),
     ["unknown key 'cohort.covariates.age.sdd'"]),
    ("unknown_dose_key", job((ORAL_DOSE, ORAL_DOSE + "ammount = 5.0\n")), ["unknown key 'arms[0].doses[0].ammount'"]),
    ("unknown_solver_key", job(("rtol = 1e-6\n", "rtol = 1e-6\nreltol = 1e-3\n")), ["unknown key 'solver.reltol'"]),
    ("missing_job_seed", job(("seed = 7\n", "")), ["missing key 'job.seed'"]),
    ("missing_job_name", job(('name = "bad_input"\n', "")), ["missing key 'job.name'"]),
    ("missing_model_name", job(('name = "pk_1cmt"\n', "")), ["missing key 'model.name'"]),
    ("missing_arms", job(("[[arms]]\nname = \"oral\"\n[[arms.doses]]\n" + ORAL_DOSE + "\n"
                          "[[arms]]\nname = \"infusion\"\n[[arms.doses]]\n" + INF_DOSE, "")),
     ["missing key 'arms'"]),
    ("missing_outputs_variables", job(('variables = ["C", "E"]\n', "")), ["missing key 'outputs.variables'"]),
    ("missing_outputs_times", job(("times = [0.0, 1.0, 2.0, 6.0, 12.0, 24.0]\n", "")), ["missing key 'outputs.times'"]),
    ("missing_dose_amount", job(("amount = 100.0\n", "")), ["missing key 'arms[0].doses[0].amount'"]),
    ("missing_cohort_size_and_csv", job(("size = 12\n", "")), ["cohort", "size", "cohort.csv"]),
    # --- wrong types / ranges in [job]
    ("seed_string", job(("seed = 7\n", 'seed = "abc"\n')), ["job.seed", "'abc'"]),
    ("seed_negative", job(("seed = 7\n", "seed = -1\n")), ["job.seed", "-1"]),
    ("seed_float", job(("seed = 7\n", "seed = 7.5\n")), ["job.seed", "7.5"]),
    ("seed_2_pow_63", job(("seed = 7\n", "seed = 9223372036854775808\n")), ["job.seed", "9223372036854775808"]),
    ("size_float", job(("size = 12\n", "size = 1.5\n")), ["cohort.size", "1.5"]),
    # a TOML string or boolean is not a number: no silent coercion ("12" -> 12, true -> 1)
    ("size_string_digits", job(("size = 12\n", 'size = "12"\n')), ["cohort.size", "'12'"]),
    ("size_bool", job(("size = 12\n", "size = true\n")), ["cohort.size", "True"]),
    ("seed_string_digits", job(("seed = 7\n", 'seed = "7"\n')), ["job.seed", "'7'"]),
    ("dose_count_bool", job(("count = 2\n", "count = true\n")), ["arms[0].doses[0].count", "True"]),
    ("dose_amount_bool", job(("amount = 100.0\n", "amount = true\n")), ["arms[0].doses[0].amount", "True"]),
    ("dose_amount_numeric_string", job(("amount = 100.0\n", 'amount = "1e2"\n')),
     ["arms[0].doses[0].amount", "'1e2'"]),
    ("seed_beyond_int64", job(("seed = 7\n", "seed = 99999999999999999999999\n")),
     ["job.seed", "99999999999999999999999"]),
    ("size_too_large", job(("size = 12\n", "size = 2199023255553\n")), ["cohort.size", "2199023255553"]),
    ("chunk_size_zero", job(("chunk_size = 8\n", "chunk_size = 0\n")), ["job.chunk_size", "0"]),
    ("chunk_size_negative", job(("chunk_size = 8\n", "chunk_size = -8\n")), ["job.chunk_size", "-8"]),
    ("backend_bogus", job(('backend = "numpy"\n', 'backend = "bogus"\n')), ["job.backend", "'bogus'"]),
    ("job_name_with_slash", job(('name = "bad_input"\n', 'name = "../../etc"\n')), ["job.name", "'../../etc'"]),
    ("solver_rtol_negative", job(("rtol = 1e-6\n", "rtol = -1e-6\n")), ["solver.rtol", "-1e-06"]),
    ("solver_method_unknown", job(("rtol = 1e-6\n", 'method = "euler"\nrtol = 1e-6\n')), ["solver.method", "'euler'"]),
    # --- doses
    ("dose_negative", job(("amount = 100.0\n", "amount = -100.0\n")), ["arms[0].doses[0].amount", "-100.0"]),
    ("dose_zero", job(("amount = 100.0\n", "amount = 0.0\n")), ["arms[0].doses[0].amount", "0.0"]),
    ("dose_nan", job(("amount = 100.0\n", "amount = nan\n")), ["arms[0].doses[0].amount", "nan"]),
    ("dose_inf", job(("amount = 100.0\n", "amount = inf\n")), ["arms[0].doses[0].amount", "inf"]),
    ("dose_string", job(("amount = 100.0\n", 'amount = "100 mg"\n')), ["arms[0].doses[0].amount", "'100 mg'"]),
    ("dose_interval_zero", job(("interval = 12.0\n", "interval = 0.0\n")), ["arms[0].doses[0].interval", "0.0"]),
    ("dose_time_negative", job((ORAL_DOSE, ORAL_DOSE + "time = -1.0\n")), ["arms[0].doses[0].time", "-1.0"]),
    ("dose_count_zero", job(("count = 2\n", "count = 0\n")), ["arms[0].doses[0].count", "0"]),
    ("dose_count_without_interval", job(("interval = 12.0\ncount = 2\n", "count = 2\n")),
     ["arms[0].doses[0]", "count=2", "interval"]),
    ("infusion_without_duration", job((INF_DOSE, INF_DOSE.replace("duration = 1.0\n", ""))),
     ["arms[1].doses[0]", "'iv_infusion'", "duration"]),
    ("infusion_longer_than_interval", job((INF_DOSE, INF_DOSE.replace("1.0", "13.0") + "interval = 12.0\ncount = 2\n")),
     ["arms[1].doses[0]", "duration=13.0", "interval=12.0"]),
    ("duration_on_oral", job((ORAL_DOSE, ORAL_DOSE + "duration = 1.0\n")), ["arms[0].doses[0]", "duration", "'oral'"]),
    ("unknown_route", job(('route = "oral"\n', 'route = "intramuscular"\n')),
     ["arms[0].doses[0].route", "'intramuscular'"]),
    ("arm_allocation_negative", job(('name = "oral"\n', 'name = "oral"\nallocation = -1.0\n')),
     ["arms[0].allocation", "-1.0"]),
    ("dose_count_too_large", job(("count = 2\n", "count = 100001\n")), ["arms[0].doses[0].count", "100001"]),
    ("arms_is_a_table_not_array", job(("[[arms]]\nname = \"oral\"\n[[arms.doses]]\n" + ORAL_DOSE + "\n"
                                       "[[arms]]\nname = \"infusion\"\n[[arms.doses]]\n" + INF_DOSE,
                                       '[arms]\nname = "oral"\n')),
     ["arms", "{'name': 'oral'}"]),
    ("arms_empty_list", job(("[[arms]]\nname = \"oral\"\n[[arms.doses]]\n" + ORAL_DOSE + "\n"
                             "[[arms]]\nname = \"infusion\"\n[[arms.doses]]\n" + INF_DOSE, ""),
                            ("[outputs]\n", "arms = []\n[outputs]\n")),
     ["{job}", "arms"]),
    ("duplicate_arm_names", job(('name = "infusion"\n', 'name = "oral"\n')), ["arms", "'oral'", "unique"]),
    # --- model
    ("unknown_model", job(('name = "pk_1cmt"\n', 'name = "pk_nonexistent"\n')), ["model.name", "'pk_nonexistent'"]),
    ("unknown_model_parameter", job(("ka = 1.1\n", "ka = 1.1\nVmax = 3.0\n")), ["model.parameters.Vmax"]),
    ("parameter_of_other_model_Q", job(("ka = 1.1\n", "ka = 1.1\nQ = 8.0\n")), ["model.parameters.Q"]),
    ("negative_typical_CL", job(("CL = 4.0\n", "CL = -4.0\n")), ["model.parameters.CL", "-4.0"]),
    ("zero_typical_V1", job(("V1 = 25.0\n", "V1 = 0.0\n")), ["model.parameters.V1", "0.0"]),
    ("nan_typical_CL", job(("CL = 4.0\n", "CL = nan\n")), ["model.parameters.CL", "nan"]),
    ("string_typical_CL", job(("CL = 4.0\n", 'CL = "4"\n')), ["model.parameters.CL", "'4'"]),
    # --- cohort: size / source
    ("empty_cohort_size_0", job(("size = 12\n", "size = 0\n")), ["cohort.size", "0"]),
    ("size_and_csv", job(("size = 12\n", 'size = 12\ncsv = { path = "c.csv", id_column = "id", '
                                           'consent_column = "consent" }\n')),
     ["cohort", "'size'", "cohort.csv"]),
    # --- cohort: distributions
    ("normal_sd_negative", job((AGE, AGE.replace("sd = 10.0", "sd = -1.0"))), ["cohort.covariates.age.sd", "-1.0"]),
    ("normal_sd_zero", job((AGE, AGE.replace("sd = 10.0", "sd = 0.0"))), ["cohort.covariates.age.sd", "0.0"]),
    ("lognormal_median_negative", job(("median = 70.0\n", "median = -70.0\n")),
     ["cohort.covariates.weight.median", "-70.0"]),
    ("distribution_missing", job((AGE, AGE.replace('distribution = "normal"\n', ""))),
     ["cohort.covariates.age", "distribution"]),
    ("covariate_name_with_space", job(("[cohort.covariates.crcl]", "[cohort.covariates.'c rcl']"),
                                      (CORR_V, 'variables = ["age", "weight"]'),
                                      (CORR_M, "matrix = [[1.0, 0.1], [0.1, 1.0]]")),
     ["cohort.covariates", "'c rcl'"]),
    ("unknown_distribution", job((AGE, AGE.replace('"normal"', '"gamma"'))),
     ["cohort.covariates.age", "'gamma'"]),
    ("truncation_low_ge_high", job((AGE, AGE.replace("low = 18.0", "low = 95.0"))),
     ["cohort.covariates.age", "low=95.0", "high=90.0"]),
    ("truncation_low_eq_high", job((AGE, AGE.replace("low = 18.0", "low = 90.0"))),
     ["cohort.covariates.age", "low=90.0", "high=90.0"]),
    ("probabilities_not_summing_to_1", job((SEX_P, "probabilities = [0.5, 0.6]")),
     ["cohort.covariates.sex", "[0.5, 0.6]", "sum"]),
    ("probability_negative", job((SEX_P, "probabilities = [1.5, -0.5]")),
     ["cohort.covariates.sex.probabilities[1]", "-0.5"]),
    ("categories_probabilities_length_mismatch", job((SEX_P, "probabilities = [0.5, 0.25, 0.25]")),
     ["cohort.covariates.sex", "categories has 2", "probabilities has 3"]),
    ("categories_duplicate", job(('categories = ["F", "M"]', 'categories = ["F", "F"]')),
     ["cohort.covariates.sex", "duplicates"]),
    # --- cohort: correlation
    ("correlation_not_psd", job((CORR_M, "matrix = [[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]]")),
     ["cohort.correlation", "matrix", "positive semi-definite"]),
    ("correlation_not_symmetric", job((CORR_M, "matrix = [[1.0, 0.1, -0.5], [0.2, 1.0, 0.3], [-0.5, 0.3, 1.0]]")),
     ["cohort.correlation", "matrix", "symmetric"]),
    ("correlation_diagonal_not_1", job((CORR_M, "matrix = [[2.0, 0.1, -0.5], [0.1, 1.0, 0.3], [-0.5, 0.3, 1.0]]")),
     ["cohort.correlation", "matrix", "diagonal"]),
    ("correlation_entry_above_1", job((CORR_M, "matrix = [[1.0, 1.5, 0.0], [1.5, 1.0, 0.0], [0.0, 0.0, 1.0]]")),
     ["cohort.correlation", "matrix"]),
    ("correlation_wrong_shape", job((CORR_M, "matrix = [[1.0, 0.1], [0.1, 1.0]]")),
     ["cohort.correlation", "matrix", "3x3"]),
    ("correlation_ragged_matrix", job((CORR_M, "matrix = [[1.0, 0.1, -0.5], [0.1, 1.0], [-0.5, 0.3, 1.0]]")),
     ["cohort.correlation", "matrix"]),
    ("correlation_variable_not_declared", job((CORR_V, 'variables = ["age", "weight", "bmi"]')),
     ["correlation.variables", "'bmi'"]),
    ("correlation_categorical_variable", job((CORR_V, 'variables = ["age", "weight", "sex"]'),
                                             (CORR_M, "matrix = [[1.0, 0.1, 0.0], [0.1, 1.0, 0.0], [0.0, 0.0, 1.0]]")),
     ["correlation.variables", "'sex'"]),
    # --- cohort: variability
    ("omega_wrong_shape", job((OMEGA, "omega = [[0.09, 0.0, 0.0], [0.0, 0.04, 0.0], [0.0, 0.0, 0.1]]")),
     ["cohort.variability", "omega", "2x2", "[3, 3]"]),
    ("omega_negative_variance", job((OMEGA, "omega = [[-0.09, 0.0], [0.0, 0.04]]")),
     ["cohort.variability", "omega", "-0.09"]),
    ("omega_not_psd", job((OMEGA, "omega = [[0.09, 0.5], [0.5, 0.04]]")),
     ["cohort.variability", "omega", "positive semi-definite"]),
    ("omega_string", job((OMEGA, 'omega = "diag(0.09, 0.04)"')), ["cohort.variability.omega", "'diag(0.09, 0.04)'"]),
    ("omega_nan", job((OMEGA, "omega = [[nan, 0.0], [0.0, 0.04]]")), ["cohort.variability.omega", "nan"]),
    ("variability_unknown_parameter", job(('parameters = ["CL", "V1"]', 'parameters = ["CL", "Vd"]')),
     ["'Vd'"]),
    # --- cohort: covariate effects
    ("effect_unknown_covariate", job(('covariate = "weight"', 'covariate = "wieght"')),
     ["covariate_effects[0].covariate", "'wieght'"]),
    ("effect_unknown_parameter", job(('parameter = "CL"\ncovariate', 'parameter = "Cl"\ncovariate')), ["'Cl'"]),
    ("effect_power_without_exponent", job(("exponent = 0.75\n", "")), ["cohort.covariate_effects[0]", "exponent"]),
    ("effect_unknown_model", job(('model = "power"', 'model = "sigmoid"')),
     ["cohort.covariate_effects[0].model", "'sigmoid'"]),
    # --- outputs
    ("times_not_increasing", job(("times = [0.0, 1.0, 2.0, 6.0, 12.0, 24.0]", "times = [0.0, 2.0, 1.0, 6.0]")),
     ["outputs.times", "[0.0, 2.0, 1.0, 6.0]", "increasing"]),
    ("times_empty", job(("times = [0.0, 1.0, 2.0, 6.0, 12.0, 24.0]", "times = []")), ["outputs.times", "[]"]),
    ("times_duplicate", job(("times = [0.0, 1.0, 2.0, 6.0, 12.0, 24.0]", "times = [0.0, 1.0, 1.0]")),
     ["outputs.times", "increasing"]),
    ("times_negative", job(("times = [0.0, 1.0, 2.0, 6.0, 12.0, 24.0]", "times = [-1.0, 1.0]")),
     ["outputs.times[0]", "-1.0"]),
    ("time_grid_stop_before_start", job(("times = [0.0, 1.0, 2.0, 6.0, 12.0, 24.0]",
                                         "times = { start = 10.0, stop = 5.0, step = 1.0 }")),
     ["outputs.times", "stop=5.0", "start=10.0"]),
    ("time_grid_step_zero", job(("times = [0.0, 1.0, 2.0, 6.0, 12.0, 24.0]",
                                 "times = { start = 0.0, stop = 5.0, step = 0.0 }")),
     ["outputs.times.step", "0.0"]),
    ("unknown_output_variable", job(('variables = ["C", "E"]', 'variables = ["C", "AUC"]')),
     ["outputs.variables[1]", "'AUC'"]),
    ("empty_output_variables", job(('variables = ["C", "E"]', "variables = []")), ["outputs.variables", "[]"]),
    ("biomarker_variable_not_in_outputs", job(('variables = ["C", "E"]', 'variables = ["E"]')),
     ["outputs.biomarkers[0].variable", "'C'"]),
    ("biomarker_unknown_statistic", job(('statistic = "max"', 'statistic = "median"')),
     ["outputs.biomarkers[0].statistic", "'median'"]),
    ("time_above_without_threshold", job((BM_AUC, BM_AUC.replace('"auc"\n', '"time_above"\n'))),
     ["outputs.biomarkers[1]", "time_above", "threshold"]),
    ("duplicate_biomarker_names", job(('name = "auc"', 'name = "cmax"')), ["outputs.biomarkers", "'cmax'", "unique"]),
]


@pytest.mark.parametrize("text,must", [pytest.param(t, m, id=i) for i, t, m in JOB_CASES])
def test_bad_job_file(tmp_path, capsys, text, must):
    p = tmp_path / "job.toml"
    p.write_text(text, encoding="utf-8")
    rc = main(["validate", str(p)])
    out, err = capsys.readouterr()
    assert_one_line_error(rc, err, [m.replace("{job}", str(p)) for m in must])
    assert ": ok" not in out


def test_case_ids_unique():
    ids = [c[0] for c in JOB_CASES]
    assert len(ids) == len(set(ids))


# ----------------------------------------------------------------------------------- job file itself
def _write_non_utf8(p: Path) -> None:
    """A latin-1 'é' in a comment, as an editor with the wrong encoding would save it."""
    p.write_bytes(BASE.encode().replace(b'name = "bad_input"\n', b'name = "bad_input"  # caf\xe9\n'))


@pytest.mark.parametrize("make,must", [
    pytest.param(lambda p: None, ["{job}", "not found"], id="job_file_missing"),
    pytest.param(lambda p: p.mkdir(), ["{job}", "directory"], id="job_file_is_a_directory"),
    pytest.param(_write_non_utf8, ["{job}", "UTF-8", "byte"], id="job_file_not_utf8"),
    pytest.param(lambda p: p.write_bytes(b""), ["{job}", "missing key 'job'"], id="job_file_empty"),
    pytest.param(lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), ["{job}"], id="job_file_binary"),
])
def test_bad_job_path(tmp_path, capsys, make, must):
    p = tmp_path / "job.toml"
    make(p)
    rc = main(["validate", str(p)])
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, [m.replace("{job}", str(p)) for m in must])


@pytest.mark.parametrize("case", ["toml_syntax_error", "dose_nan", "correlation_not_psd"])
def test_real_entry_point_one_line(tmp_path, case):
    """A few job errors through the installed `twin` entry point in a subprocess (warnings,
    logging or imports printing to stderr would show up here and not in-process)."""
    text, must = next((t, m) for i, t, m in JOB_CASES if i == case)
    p = tmp_path / "job.toml"
    p.write_text(text)
    for cmd in (["validate", p], ["run", p, "-o", tmp_path / "run"]):
        r = run_twin(*cmd, cwd=tmp_path)
        assert_one_line_error(r.returncode, r.stderr, [m.replace("{job}", str(p)) for m in must])
        assert not (tmp_path / "run").exists(), "a user error must not create the run directory"


# ----------------------------------------------------------------------------------- run-time checks
@pytest.fixture
def in_process_run(monkeypatch):
    """`main(["run", ...])` in-process; restores the SIGINT/SIGTERM handlers `twin run` installs."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for k in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "SLURM_STEP_ID", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    yield lambda *args: main(["run", *map(str, args)])
    for s, h in saved.items():
        signal.signal(s, h)


def _has_gpu() -> bool:
    try:
        import cupy  # noqa: F401

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.parametrize("out", ["run", "run/sub"], ids=["run_dir_is_a_file", "run_dir_parent_is_a_file"])
def test_run_dir_unusable(tmp_path, in_process_run, capsys, out):
    p = tmp_path / "job.toml"
    p.write_text(BASE)
    (tmp_path / "run").write_text("a file, not a directory")
    rc = in_process_run(p, "-o", tmp_path / out)
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, [str(tmp_path / out)])


@pytest.mark.skipif(_has_gpu(), reason="checks the no-GPU error")
def test_backend_cuda_without_gpu_run(tmp_path, in_process_run, capsys):
    p = tmp_path / "job.toml"
    p.write_text(job(('backend = "numpy"\n', 'backend = "cuda"\n')))
    rc = in_process_run(p, "-o", tmp_path / "run")
    out, err = capsys.readouterr()
    assert_one_line_error(rc, err, ["job.backend", "'cuda'"])
    assert not (tmp_path / "run").exists(), "no fallback: nothing may run"


@pytest.mark.skipif(_has_gpu(), reason="checks the no-GPU error")
def test_backend_cuda_without_gpu_validate(tmp_path, capsys):
    """`twin validate` must not print 'ok ... backend cuda' for a job `twin run` refuses."""
    p = tmp_path / "job.toml"
    p.write_text(job(('backend = "numpy"\n', 'backend = "cuda"\n')))
    rc = main(["validate", str(p)])
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, ["job.backend", "'cuda'"])


# Errors only the cohort builder sees (job parses, the cohort cannot be built).
COHORT_BUILD_CASES = [
    ("power_effect_on_categorical", job(('covariate = "weight"', 'covariate = "sex"')),
     ["cohort.covariate_effects[0]", "'sex'", "categorical"]),
    ("categorical_effect_on_continuous",
     job(('model = "power"\nreference = 70.0\nexponent = 0.75\n', 'model = "categorical"\nfactors = { F = 0.9, M = 1.0 }\n')),
     ["cohort.covariate_effects[0]", "'weight'", "continuous"]),
    ("categorical_effect_missing_factor",
     job(('covariate = "weight"\nmodel = "power"\nreference = 70.0\nexponent = 0.75\n',
          'covariate = "sex"\nmodel = "categorical"\nfactors = { F = 0.9 }\n')),
     ["cohort.covariate_effects[0]", "'M'"]),
    ("covariate_named_like_parameter", job(("[cohort.covariates.crcl]", "[cohort.covariates.CL]"),
                                           (CORR_V, 'variables = ["age", "weight", "CL"]')),
     ["'CL'", "clash"]),
]


@pytest.mark.parametrize("text,must", [pytest.param(t, m, id=i) for i, t, m in COHORT_BUILD_CASES])
def test_bad_cohort_run(tmp_path, in_process_run, capsys, text, must):
    p = tmp_path / "job.toml"
    p.write_text(text)
    rc = in_process_run(p, "-o", tmp_path / "run")
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, must)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,must", [pytest.param(t, m, id=i) for i, t, m in COHORT_BUILD_CASES])
def test_bad_cohort_validate(tmp_path, capsys, text, must):
    """`twin validate` must report what `twin run` would refuse."""
    p = tmp_path / "job.toml"
    p.write_text(text)
    rc = main(["validate", str(p)])
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, must)


# ----------------------------------------------------------------------------------- code injection
INJECT = "__import__('os').system('touch {marker}')"


@pytest.mark.parametrize("where", ["model_name", "parameter_key", "output_variable", "covariate_name",
                                   "job_name", "distribution", "effect_model"])
def test_code_injection_rejected(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = INJECT.format(marker=marker)
    q = json.dumps(payload)  # a TOML basic string
    text = {
        "model_name": job(('name = "pk_1cmt"\n', f"name = {q}\n")),
        "parameter_key": job(("ka = 1.1\n", f"ka = 1.1\n{q} = 1.0\n")),
        "output_variable": job(('variables = ["C", "E"]', f'variables = ["C", {q}]')),
        "covariate_name": job(("[cohort.covariates.crcl]", f"[cohort.covariates.{q}]"),
                              (CORR_V, 'variables = ["age", "weight"]'),
                              (CORR_M, "matrix = [[1.0, 0.1], [0.1, 1.0]]")),
        "job_name": job(('name = "bad_input"\n', f"name = {q}\n")),
        "distribution": job((AGE, AGE.replace('"normal"', q))),
        "effect_model": job(('model = "power"', f"model = {q}")),
    }[where]
    p = tmp_path / "job.toml"
    p.write_text(text)
    for cmd in (["validate", p], ["run", p, "-o", tmp_path / "run"]):
        r = run_twin(*cmd, cwd=tmp_path)
        assert_one_line_error(r.returncode, r.stderr, [])
        assert not marker.exists(), f"job text was executed ({where})"
    assert not Path("/tmp/pwned").exists() or Path("/tmp/pwned").stat().st_mtime < p.stat().st_mtime


# ----------------------------------------------------------------------------------- CSV cohorts
CSV_JOB = textwrap.dedent("""\
    [job]
    name = "csv_bad"
    seed = 3
    chunk_size = 4
    backend = "numpy"

    [model]
    name = "pk_1cmt"
    [model.parameters]
    CL = 4.0
    V1 = 25.0

    [solver]
    rtol = 1e-6
    atol = 1e-8

    [cohort.csv]
    path = "patients.csv"
    id_column = "mrn"
    consent_column = "consent"
    key_env = "TWIN_TEST_BAD_INPUT_KEY"
    [cohort.csv.covariates.weight]
    column = "weight_kg"
    unit = "kg"
    [cohort.csv.covariates.sex]
    column = "sex"
    categories = ["F", "M"]
    [cohort.csv.parameters.CL]
    column = "cl_ind"
    unit = "L/h"

    [[cohort.covariate_effects]]
    parameter = "V1"
    covariate = "weight"
    model = "power"
    reference = 70.0
    exponent = 1.0

    [[arms]]
    name = "iv"
    [[arms.doses]]
    amount = 100.0
    route = "iv_bolus"

    [outputs]
    times = [0.0, 1.0, 4.0, 12.0]
    variables = ["C"]

    [[outputs.biomarkers]]
    name = "cmax"
    variable = "C"
    statistic = "max"
""")
KEY = "k3y-for-bad-input-tests-0b5e9c"
CSV_HEADER = "mrn,consent,weight_kg,sex,cl_ind\n"
CSV_ROWS = ("MRN-0000101,true,70.5,F,4.1\n"
            "MRN-0000102,yes,82.0,M,3.9\n"
            "MRN-0000103,no,64.2,F,4.4\n"
            "MRN-0000104,1,91.3,M,5.0\n")


def _csv_case(tmp_path: Path, csv: bytes | None, text: str = CSV_JOB):
    p = tmp_path / "job.toml"
    p.write_text(text)
    if csv is not None:
        (tmp_path / "patients.csv").write_bytes(csv)
    return p


CSV_CASES = [
    ("csv_file_missing", None, CSV_JOB, ["patients.csv", "not found"]),
    ("csv_path_is_directory", "DIR", CSV_JOB, ["patients.csv", "directory"]),
    ("csv_empty_file", b"", CSV_JOB, ["patients.csv", "empty"]),
    ("csv_whitespace_only", b"\n  \n", CSV_JOB, ["patients.csv", "empty"]),
    ("csv_header_only", CSV_HEADER.encode(), CSV_JOB, ["patients.csv", "no data rows"]),
    ("csv_not_utf8", (CSV_HEADER + CSV_ROWS).encode().replace(b"F,4.1", b"F\xe9,4.1"), CSV_JOB,
     ["patients.csv", "UTF-8", "byte"]),
    ("csv_missing_id_column", (CSV_HEADER + CSV_ROWS).replace("mrn,", "patient,").encode(), CSV_JOB,
     ["patients.csv", "'mrn'", "cohort.csv.id_column"]),
    ("csv_missing_consent_column", (CSV_HEADER + CSV_ROWS).replace(",consent,", ",consented,").encode(), CSV_JOB,
     ["patients.csv", "'consent'", "cohort.csv.consent_column"]),
    ("csv_missing_covariate_column", (CSV_HEADER + CSV_ROWS).replace("weight_kg", "wt").encode(), CSV_JOB,
     ["patients.csv", "'weight_kg'", "cohort.csv.covariates.weight"]),
    ("csv_missing_parameter_column", (CSV_HEADER + CSV_ROWS).replace("cl_ind", "cl").encode(), CSV_JOB,
     ["patients.csv", "'cl_ind'", "cohort.csv.parameters.CL"]),
    ("csv_bad_consent_value", (CSV_HEADER + CSV_ROWS.replace("MRN-0000103,no", "MRN-0000103,maybe")).encode(), CSV_JOB,
     ["patients.csv", "line 4", "'consent'", "'maybe'"]),
    ("csv_empty_consent_value", (CSV_HEADER + CSV_ROWS.replace("MRN-0000102,yes", "MRN-0000102,")).encode(), CSV_JOB,
     ["patients.csv", "line 3", "'consent'", "''"]),
    ("csv_no_row_with_consent", (CSV_HEADER + "".join(
        r.split(",", 2)[0] + ",false," + r.split(",", 2)[2] for r in CSV_ROWS.splitlines(keepends=True))).encode(),
     CSV_JOB, ["patients.csv", "empty cohort", "4 excluded"]),
    ("csv_duplicate_ids", (CSV_HEADER + CSV_ROWS + "MRN-0000102,true,60.0,F,4.0\n").encode(), CSV_JOB,
     ["patients.csv", "duplicate", "'mrn'", "lines 3 and 6"]),
    ("csv_empty_id", (CSV_HEADER + CSV_ROWS.replace("MRN-0000104", "  ")).encode(), CSV_JOB,
     ["patients.csv", "line 5", "'mrn'"]),
    ("csv_ragged_row", (CSV_HEADER + CSV_ROWS.replace("MRN-0000102,yes,82.0,M,3.9", "MRN-0000102,yes,82.0,M")).encode(),
     CSV_JOB, ["patients.csv", "line 3", "4 fields", "5"]),
    ("csv_header_repeats_column", (CSV_HEADER.replace("sex", "weight_kg") + CSV_ROWS).encode(), CSV_JOB,
     ["patients.csv", "'weight_kg'"]),
    ("csv_unterminated_quote", (CSV_HEADER + CSV_ROWS + 'MRN-0000105,true,"70.0,F,4.0\n').encode(), CSV_JOB,
     ["patients.csv", "line"]),
    ("key_env_not_set", (CSV_HEADER + CSV_ROWS).encode(), CSV_JOB, ["TWIN_TEST_BAD_INPUT_KEY"]),
    ("key_file_missing", (CSV_HEADER + CSV_ROWS).encode(),
     CSV_JOB.replace('key_env = "TWIN_TEST_BAD_INPUT_KEY"', 'key_file = "secret.key"'), ["secret.key", "not found"]),
    ("key_file_empty", (CSV_HEADER + CSV_ROWS).encode(),
     CSV_JOB.replace('key_env = "TWIN_TEST_BAD_INPUT_KEY"', 'key_file = "empty.key"'), ["empty.key", "empty"]),
    ("key_file_is_a_directory", (CSV_HEADER + CSV_ROWS).encode(),
     CSV_JOB.replace('key_env = "TWIN_TEST_BAD_INPUT_KEY"', 'key_file = "keydir"'), ["keydir", "directory"]),
    ("csv_unknown_key", (CSV_HEADER + CSV_ROWS).encode(),
     CSV_JOB.replace('id_column = "mrn"', 'id_column = "mrn"\nid_colum = "x"'), ["unknown key 'cohort.csv.id_colum'"]),
    ("csv_with_virtual_covariates", (CSV_HEADER + CSV_ROWS).encode(),
     CSV_JOB.replace("[[cohort.covariate_effects]]", '[cohort.covariates.age]\ndistribution = "constant"\nvalue = 1.0\n\n'
                                                    "[[cohort.covariate_effects]]", 1),
     ["cohort.covariates", "cohort.csv"]),
    ("csv_parameter_unknown", (CSV_HEADER + CSV_ROWS).encode(),
     CSV_JOB.replace("[cohort.csv.parameters.CL]", "[cohort.csv.parameters.Cl]"), ["'Cl'"]),
]


@pytest.mark.parametrize("csv,text,must", [pytest.param(c, t, m, id=i) for i, c, t, m in CSV_CASES])
def test_bad_csv_cohort(tmp_path, in_process_run, capsys, monkeypatch, csv, text, must):
    """CSV problems are found when the cohort is opened (`twin run`): one line, nothing written,
    and no raw identifier in the message."""
    if "TWIN_TEST_BAD_INPUT_KEY" in must:
        monkeypatch.delenv("TWIN_TEST_BAD_INPUT_KEY", raising=False)
    else:
        monkeypatch.setenv("TWIN_TEST_BAD_INPUT_KEY", KEY)
    (tmp_path / "empty.key").write_bytes(b"\n")
    (tmp_path / "keydir").mkdir()
    if csv == "DIR":
        (tmp_path / "patients.csv").mkdir()
        csv = None
    p = _csv_case(tmp_path, csv, text)
    rc = in_process_run(p, "-o", tmp_path / "run")
    _, err = capsys.readouterr()
    line = assert_one_line_error(rc, err, must)
    assert "MRN-00001" not in line, "raw identifier in an error message"
    assert KEY not in line
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------- per-patient failures
# Row by row: (mrn, consent, weight, sex, CL) -> expected status (None: excluded, no consent).
PER_PATIENT = [
    ("ok_first", "MRN-0000201", "true", "70.0", "F", "4.0", "ok"),
    ("weight_empty", "MRN-0000202", "true", "", "M", "4.0", "invalid_covariate"),
    ("weight_non_numeric", "MRN-0000203", "true", "abc", "F", "4.0", "invalid_covariate"),
    ("weight_inf", "MRN-0000204", "true", "inf", "M", "4.0", "invalid_covariate"),
    ("weight_nan_text", "MRN-0000205", "true", "NaN", "F", "4.0", "invalid_covariate"),
    ("sex_not_a_category", "MRN-0000206", "true", "70.0", "X", "4.0", "invalid_covariate"),
    ("sex_empty", "MRN-0000207", "true", "70.0", "", "4.0", "invalid_covariate"),
    ("cl_zero", "MRN-0000208", "true", "70.0", "M", "0", "invalid_parameter"),
    ("cl_negative", "MRN-0000209", "true", "70.0", "F", "-1.5", "invalid_parameter"),
    ("cl_empty", "MRN-0000210", "true", "70.0", "M", "", "invalid_parameter"),
    ("cl_non_numeric", "MRN-0000211", "true", "70.0", "F", "fast", "invalid_parameter"),
    ("weight_negative_power_effect", "MRN-0000212", "true", "-70.0", "M", "4.0", "invalid_parameter"),
    ("excluded_bad_values_ignored", "MRN-0000213", "no", "abc", "Q", "-9", None),
    ("ok_last", "MRN-0000214", "yes", " 81.5 ", "M", "3.2", "ok"),
]


@pytest.fixture(scope="module")
def per_patient_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("per_patient")
    rows = "".join(",".join(r[1:6]) + "\n" for r in PER_PATIENT)
    (d / "patients.csv").write_text(CSV_HEADER + rows)
    (d / "job.toml").write_text(CSV_JOB)
    r = run_twin("run", d / "job.toml", "-o", d / "run", "-q", cwd=d, env={"TWIN_PSEUDONYM_KEY": "",
                                                                            "TWIN_TEST_BAD_INPUT_KEY": KEY})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    with h5py.File(d / "run" / "RUN.h5", "r") as f:
        status = f["status"][()]
        pseud = [x.decode() for x in f["cohort/pseudonym"][()]]
        attrs = dict(f.attrs)
        C = f["C"][()]
    return r, status, pseud, attrs, C


@pytest.mark.parametrize("row", [pytest.param(r, id=r[0]) for r in PER_PATIENT])
def test_csv_row_status(per_patient_run, row):
    _, status, pseud, attrs, C = per_patient_run
    name, mrn, consent, w, sex, cl, want = row
    tag = hmac.new(KEY.encode(), mrn.encode(), hashlib.sha256).hexdigest()
    if want is None:
        assert tag not in pseud, "a patient without consent is in the result"
        return
    i = pseud.index(tag)
    assert int(status[i]) == STATUS_CODES[want], f"{name}: status {int(status[i])}, want {want}"
    if want == "ok":
        assert np.all(np.isfinite(C[i])) and C[i, 0] > 0  # bolus at t = 0
    else:
        assert np.all(np.isnan(C[i])), "a failed patient must have NaN outputs"


def test_csv_per_patient_run_summary(per_patient_run):
    r, status, pseud, attrs, _ = per_patient_run
    n_kept = sum(1 for row in PER_PATIENT if row[-1] is not None)
    n_failed = sum(1 for row in PER_PATIENT if row[-1] not in (None, "ok"))
    assert len(status) == n_kept
    assert int(attrs["n_failed"]) == n_failed
    assert int(attrs["n_excluded_no_consent"]) == 1
    assert f"{n_failed} failed" in r.stderr and "1 excluded" in r.stderr


# ----------------------------------------------------------------------------------- resume / audit / analysis
RUN_JOB = job(("size = 12\n", "size = 10\n"), ("chunk_size = 8\n", "chunk_size = 4\n"))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """One completed run (10 patients, 3 chunks); tests copy it before damaging anything."""
    d = tmp_path_factory.mktemp("clean")
    (d / "job.toml").write_text(RUN_JOB)
    r = run_twin("run", d / "job.toml", "-o", d / "run", "-q", cwd=d)
    assert r.returncode == 0, r.stderr
    return d / "run"


def _copy_run(clean: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(clean, dst)
    (tmp_path / "job.toml").write_text(RUN_JOB)
    return dst


def _read_all(master: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(master, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
        f.visititems(visit)
    return out


@pytest.mark.parametrize("change,must", [
    pytest.param(("seed = 7\n", "seed = 8\n"), ["job_fingerprint", "differs"], id="different_seed"),
    pytest.param(("size = 10\n", "size = 11\n"), ["job_fingerprint", "n_patients (10 in run.json, 11 now)"],
                 id="different_size"),
    pytest.param(("times = [0.0, 1.0, 2.0, 6.0, 12.0, 24.0]", "times = [0.0, 1.0]"), ["job_fingerprint", "n_times"],
                 id="different_times"),
    pytest.param(("CL = 4.0\n", "CL = 4.5\n"), ["job_fingerprint", "cohort_fingerprint"], id="different_typical_CL"),
])
def test_resume_with_different_job(clean_run, tmp_path, change, must):
    run = _copy_run(clean_run, tmp_path)
    p = tmp_path / "job2.toml"
    p.write_text(edit(RUN_JOB, change))
    r = run_twin("run", p, "-o", run, "-q", cwd=tmp_path)
    assert_one_line_error(r.returncode, r.stderr, [str(run), *must])


def test_resume_ignores_comments_and_slurm_resources(clean_run, tmp_path):
    """Resume compares the job's science, not its text: a comment and a [slurm] section added for
    `twin submit` leave the run resumable (and the result unchanged)."""
    run = _copy_run(clean_run, tmp_path)
    before = _read_all(run / "RUN.h5")
    for j in (run / "journal").glob("*.jsonl"):  # forget the last chunk: resume must recompute it
        lines = j.read_text().splitlines(keepends=True)
        j.write_text("".join(l for l in lines if '"chunk":2,' not in l))
    p = tmp_path / "job2.toml"
    p.write_text("# resubmitted on the cluster\n" + RUN_JOB + '\n[slurm]\ntime = "0:10:00"\npartition = "debug"\n')
    r = run_twin("run", p, "-o", run, "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    after = _read_all(run / "RUN.h5")
    for k, v in before.items():
        if k in after and v.dtype.kind in "fiu":
            np.testing.assert_array_equal(after[k], v, err_msg=k)


@pytest.mark.parametrize("damage,must", [
    pytest.param(b"\x00\xff\xfegarbage\x89", ["run.json"], id="run_json_garbage_bytes"),
    pytest.param(b"", ["run.json"], id="run_json_empty"),
    pytest.param(b'{"format": "twin-run/1", ', ["run.json"], id="run_json_truncated"),
    pytest.param(b"[1, 2, 3]\n", ["run.json", "not a JSON object"], id="run_json_not_object"),
])
def test_resume_corrupt_manifest(clean_run, tmp_path, damage, must):
    run = _copy_run(clean_run, tmp_path)
    (run / "run.json").write_bytes(damage)
    r = run_twin("run", tmp_path / "job.toml", "-o", run, "-q", cwd=tmp_path)
    assert_one_line_error(r.returncode, r.stderr, must)


def _flip_chunk_data(shard: Path) -> None:
    """Overwrite the raw bytes of one chunk's output data inside an otherwise valid shard."""
    with h5py.File(shard, "r") as f:
        ds = f["chunk_000001/C"]
        off, size = ds.id.get_offset(), ds.id.get_storage_size()
    assert off is not None and size > 0
    with open(shard, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\xde\xad\xbe\xef" * (size // 4))


@pytest.mark.parametrize("damage", [
    pytest.param(lambda s: s.write_bytes(os.urandom(s.stat().st_size)), id="shard_all_garbage"),
    pytest.param(lambda s: s.write_bytes(s.read_bytes()[: s.stat().st_size // 3]), id="shard_truncated"),
    pytest.param(lambda s: s.unlink(), id="shard_deleted"),
    pytest.param(_flip_chunk_data, id="shard_chunk_bytes_overwritten"),
])
def test_resume_corrupt_shard_recomputes(clean_run, tmp_path, damage):
    run = _copy_run(clean_run, tmp_path)
    want = _read_all(clean_run / "RUN.h5")
    damage(run / "shards" / "a001-r0000.h5")
    r = run_twin("run", tmp_path / "job.toml", "-o", run, "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    got = _read_all(run / "RUN.h5")
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    a = run_twin("audit", run, cwd=tmp_path)
    assert a.returncode == 0, a.stderr


def test_resume_garbage_journal_line_recomputes(clean_run, tmp_path):
    run = _copy_run(clean_run, tmp_path)
    j = run / "journal" / "a001-r0000.jsonl"
    lines = j.read_bytes().split(b"\n")
    lines[1] = b"\x00garbage{" + lines[1][:10]
    j.write_bytes(b"\n".join(lines))
    r = run_twin("run", tmp_path / "job.toml", "-o", run, "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want, got = _read_all(clean_run / "RUN.h5"), _read_all(run / "RUN.h5")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _tamper_audit_record(run: Path) -> None:
    p = run / "audit.jsonl"
    lines = p.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["ranks"] = 99
    lines[0] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    p.write_text("\n".join(lines) + "\n")


def _tamper_job_attr(run: Path) -> None:
    with h5py.File(run / "RUN.h5", "r+") as f:
        f.attrs["job_toml"] = str(f.attrs["job_toml"]).replace("seed = 7", "seed = 8")


def _delete_audit_record(run: Path) -> None:
    p = run / "audit.jsonl"
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines[1:]) + "\n")


@pytest.mark.parametrize("tamper", [
    pytest.param(lambda r: _flip_chunk_data(r / "shards" / "a001-r0000.h5"), id="shard_data_changed"),
    pytest.param(_tamper_audit_record, id="audit_record_edited"),
    pytest.param(_delete_audit_record, id="audit_record_deleted"),
    pytest.param(_tamper_job_attr, id="job_text_in_RUN_h5_edited"),
    pytest.param(lambda r: (r / "audit.jsonl").unlink(), id="audit_log_deleted"),
    pytest.param(lambda r: (r / "RUN.h5").write_bytes(b"garbage"), id="RUN_h5_garbage"),
])
def test_audit_tampered_run(clean_run, tmp_path, tamper):
    run = _copy_run(clean_run, tmp_path)
    ok = run_twin("audit", run, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    tamper(run)
    r = run_twin("audit", run, cwd=tmp_path)
    assert r.returncode == 3, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() and all(line.startswith("twin audit: ") for line in r.stderr.splitlines())


def test_audit_not_a_run_dir(tmp_path):
    r = run_twin("audit", tmp_path / "nope", cwd=tmp_path)
    assert r.returncode in (2, 3), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", ["summary", "report"])
@pytest.mark.parametrize("damage,must", [
    pytest.param("missing", ["RUN.h5", "does not exist"], id="missing"),
    pytest.param("garbage", ["RUN.h5", "not a readable HDF5 file"], id="garbage"),
    pytest.param("empty", ["RUN.h5"], id="empty_file"),
    pytest.param("not_a_run", ["RUN.h5", "not a twin run result"], id="hdf5_not_a_run"),
    pytest.param("shard_missing", ["RUN.h5", "a001-r0000.h5", "missing"], id="shard_missing"),
    pytest.param("shard_garbage", ["RUN.h5", "a001-r0000.h5"], id="shard_garbage"),
])
def test_analysis_bad_result(clean_run, tmp_path, capsys, cmd, damage, must):
    run = _copy_run(clean_run, tmp_path)
    master = run / "RUN.h5"
    if damage == "missing":
        master.unlink()
    elif damage == "garbage":
        master.write_bytes(b"\x00\x01garbage not hdf5" * 50)
    elif damage == "empty":
        master.write_bytes(b"")
    elif damage == "not_a_run":
        master.unlink()
        with h5py.File(master, "w") as f:
            f["x"] = np.arange(3)
    elif damage == "shard_missing":
        (run / "shards" / "a001-r0000.h5").unlink()
    elif damage == "shard_garbage":
        (run / "shards" / "a001-r0000.h5").write_bytes(b"garbage" * 100)
    args = [cmd, str(master)] + (["-o", str(tmp_path / "plots")] if cmd == "report" else [])
    rc = main(args)
    out, err = capsys.readouterr()
    assert_one_line_error(rc, err, must)


@pytest.mark.parametrize("cmd", ["summary", "report"])
def test_analysis_real_entry_point(tmp_path, cmd):
    args = [cmd, tmp_path / "RUN.h5"] + (["-o", tmp_path / "plots"] if cmd == "report" else [])
    r = run_twin(*args, cwd=tmp_path)
    assert_one_line_error(r.returncode, r.stderr, ["RUN.h5", "does not exist"])


def test_report_output_is_a_file(clean_run, tmp_path, capsys):
    (tmp_path / "plots").write_text("not a directory")
    rc = main(["report", str(clean_run / "RUN.h5"), "-o", str(tmp_path / "plots")])
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, ["plots"])
