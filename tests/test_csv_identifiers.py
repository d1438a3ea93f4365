"""Real identifiers never leave the CSV: a CSV cohort run through the real `twin` CLI leaves no raw
identifier (consenting or not) and no key anywhere in the run directory; pseudonyms are
HMAC-SHA256(key, id) of the consenting rows in file order; exclusions are counted and reported."""

from __future__ import annotations

import hashlib
import hmac
import textwrap
from pathlib import Path

import h5py
import numpy as np
from .helpers import run_twin

# 30 rows; rows without consent are spread through the file (first, middle, last included).
_NO_CONSENT = {0, 4, 11, 12, 20, 29}
_CONSENT_SPELLINGS_TRUE = ["true", "TRUE", "yes", "Y", "1", "True"]
_CONSENT_SPELLINGS_FALSE = ["false", "no", "N", "0", "FALSE", "No"]


def _rows() -> list[dict]:
    rng = np.random.default_rng(20240611)
    rows = []
    for i in range(30):
        rows.append({
            "mrn": f"MRN-{12345 + 7919 * i:07d}",
            "consent": (_CONSENT_SPELLINGS_FALSE if i in _NO_CONSENT else _CONSENT_SPELLINGS_TRUE)[i % 6],
            "age": f"{rng.uniform(19, 88):.0f}",
            "weight_kg": f"{rng.lognormal(np.log(75), 0.2):.1f}",
            "sex": "F" if rng.uniform() < 0.5 else "M",
        })
    return rows


ROWS = _rows()
KEPT = [r for i, r in enumerate(ROWS) if i not in _NO_CONSENT]
EXCLUDED = [r for i, r in enumerate(ROWS) if i in _NO_CONSENT]
ENV_KEY = "s3cr3t-pseudonym-key-9f1c2e7a4b"
FILE_KEY = "another-s3cr3t-key/for+the=file_55d0"


def _csv() -> str:
    cols = ["mrn", "consent", "age", "weight_kg", "sex"]
    return ",".join(cols) + "\n" + "".join(",".join(r[c] for c in cols) + "\n" for r in ROWS)


def _job(key_line: str) -> str:
    return textwrap.dedent(f"""\
        [job]
        name = "csv_ids"
        seed = 11
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

        [cohort.csv]
        path = "data/patients.csv"
        id_column = "mrn"
        consent_column = "consent"
        {key_line}
        [cohort.csv.covariates.age]
        column = "age"
        unit = "year"
        [cohort.csv.covariates.weight]
        column = "weight_kg"
        unit = "kg"
        [cohort.csv.covariates.sex]
        column = "sex"
        categories = ["F", "M"]

        [cohort.variability]
        parameters = ["CL"]
        omega = [[0.09]]

        [[cohort.covariate_effects]]
        parameter = "CL"
        covariate = "weight"
        model = "power"
        reference = 70.0
        exponent = 0.75

        [[arms]]
        name = "A"
        [[arms.doses]]
        amount = 100.0
        route = "oral"

        [[arms]]
        name = "B"
        [[arms.doses]]
        amount = 200.0
        route = "oral"

        [outputs]
        times = [0.0, 1.0, 4.0, 12.0]
        variables = ["C"]

        [[outputs.biomarkers]]
        name = "cmax"
        variable = "C"
        statistic = "max"
    """)


def _setup(tmp_path: Path, key_line: str) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "patients.csv").write_text(_csv())
    p = tmp_path / "job.toml"
    p.write_text(_job(key_line))
    return p


def _run(tmp_path: Path, job: Path, key_env: dict):
    # no key in the environment other than the one the case means to give
    env = {"TWIN_PSEUDONYM_KEY": "", "TWIN_TEST_ID_KEY": "", **key_env}
    r = run_twin("run", job, "-o", tmp_path / "run", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    return r


def _hmac(key: str, mrn: str) -> str:
    return hmac.new(key.encode(), mrn.encode(), hashlib.sha256).hexdigest()


def _secrets(key: str) -> list[tuple[str, bytes]]:
    """(description, bytes) that must appear nowhere: identifiers in UTF-8 and UTF-16, the key."""
    out = []
    for r in ROWS:
        for enc in ("utf-8", "utf-16-le"):
            out.append((f"identifier {r['mrn']} ({enc})", r["mrn"].encode(enc)))
    for enc in ("utf-8", "utf-16-le"):
        out.append((f"key ({enc})", key.encode(enc)))
    out.append(("key (hex)", key.encode().hex().encode()))
    return out


def _check_run(tmp_path: Path, r, key: str, key_ref: str) -> None:
    run = tmp_path / "run"
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "RUN.h5" for p in files) and any(p.suffix == ".h5" and p.parent.name == "shards" for p in files)

    # (1) no raw identifier (kept or excluded) and no key in any byte of any file, nor in the output
    secrets = _secrets(key)
    leaks = [f"{what} in {p.relative_to(run)}" for p in files for what, s in secrets if s in p.read_bytes()]
    leaks += [f"{what} in twin run output" for what, s in secrets if s in (r.stdout + r.stderr).encode("utf-8")]
    assert not leaks, "\n".join(leaks)

    with h5py.File(run / "RUN.h5", "r") as f:
        pseud = [x.decode("ascii") for x in f["cohort/pseudonym"][()]]
        attrs = dict(f.attrs)
        weight = f["cohort/weight"][()]
        age = f["cohort/age"][()]
        status = f["status"][()]

    # (2) HMAC-SHA256(key, id) of the consenting rows, in file order
    assert pseud == [_hmac(key, row["mrn"]) for row in KEPT]
    excluded_tags = {_hmac(key, row["mrn"]) for row in EXCLUDED}
    assert not excluded_tags & set(pseud)
    # the rows are the consenting ones in order (covariates line up with pseudonyms)
    np.testing.assert_array_equal(weight, [float(row["weight_kg"]) for row in KEPT])
    np.testing.assert_array_equal(age, [float(row["age"]) for row in KEPT])
    assert np.all(status == 0)

    # (3) exclusions counted in RUN.h5 and printed by `twin run`
    assert int(attrs["n_patients"]) == len(KEPT) == 24
    assert int(attrs["n_excluded_no_consent"]) == len(EXCLUDED) == 6
    assert f"({len(KEPT)} patients" in r.stdout and f"{len(EXCLUDED)} excluded without consent" in r.stdout, r.stdout

    # (4) the job text stored in the result names where the key is, never the key itself
    job_text = attrs["job_toml"]
    job_text = job_text.decode() if isinstance(job_text, bytes) else str(job_text)
    assert key_ref in job_text
    assert key not in job_text
    assert job_text == (tmp_path / "job.toml").read_text()


def test_key_from_env_var(tmp_path):
    job = _setup(tmp_path, 'key_env = "TWIN_TEST_ID_KEY"')
    r = _run(tmp_path, job, {"TWIN_TEST_ID_KEY": ENV_KEY})
    _check_run(tmp_path, r, ENV_KEY, "TWIN_TEST_ID_KEY")


def test_key_from_default_env_var(tmp_path):
    """Without key_env/key_file the key comes from $TWIN_PSEUDONYM_KEY; the job names nothing."""
    job = _setup(tmp_path, "")
    r = _run(tmp_path, job, {"TWIN_PSEUDONYM_KEY": ENV_KEY})
    _check_run(tmp_path, r, ENV_KEY, 'consent_column = "consent"')


def test_key_from_file(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pseudonym.key").write_text(FILE_KEY + "\n")  # trailing newline is not key
    job = _setup(tmp_path, 'key_file = "secrets/pseudonym.key"')
    # a key in the environment must not be used when key_file is given
    r = _run(tmp_path, job, {"TWIN_PSEUDONYM_KEY": ENV_KEY})
    _check_run(tmp_path, r, FILE_KEY, "secrets/pseudonym.key")
    # ...and the environment key leaks nowhere either
    for p in (tmp_path / "run").rglob("*"):
        if p.is_file():
            assert ENV_KEY.encode() not in p.read_bytes(), p


def test_same_key_same_pseudonyms_from_env_or_file(tmp_path):
    key = FILE_KEY
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ja = _setup(a, 'key_env = "TWIN_TEST_ID_KEY"')
    (b / "k").write_bytes(key.encode() + b"\r\n")
    jb = _setup(b, 'key_file = "k"')
    _run(a, ja, {"TWIN_TEST_ID_KEY": key})
    _run(b, jb, {})
    with h5py.File(a / "run" / "RUN.h5", "r") as fa, h5py.File(b / "run" / "RUN.h5", "r") as fb:
        np.testing.assert_array_equal(fa["cohort/pseudonym"][()], fb["cohort/pseudonym"][()])
        np.testing.assert_array_equal(fa["C"][()], fb["C"][()])
