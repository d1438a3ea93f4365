"""Observation import: long CSV and FHIR R4 Bundles, the bad-record corpus (tests/data/calib).

Each bad record must give exactly one issue naming its line/entry and field, every good record
must import, converted to the job's unit, under the cohort's keyed pseudonyms and consent rules.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from engine.errors import CohortError
from engine.observations import ObservationsSection, import_observations

DATA = Path(__file__).parent / "data" / "calib"
KEY = "test-key-not-secret"
PAT = {"path": "obs_patients.csv", "id_column": "id", "consent_column": "consent"}


class Loaded:  # what import_observations needs of a LoadedJob: path resolution
    def resolve(self, p):
        return DATA / p


def pseudo(pid: str) -> bytes:
    return hmac.digest(KEY.encode(), pid.encode(), "sha256").hex().encode()


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("TWIN_PSEUDONYM_KEY", KEY)


def csv_obs():
    sec = ObservationsSection.model_validate({"path": "bad_obs.csv", "patients": PAT, "variables": {
        "glucose": {"unit": "mg/dL"}, "systolic": {"unit": "mm[Hg]"}}})
    return import_observations(Loaded(), sec)


def test_csv_bad_records_each_named_good_records_imported():
    o = csv_obs()
    got = {(i.record, i.field) for i in o.issues}
    want = {("line 5", "time"),  # duplicate (same value)
            ("line 6", "time"),  # non-monotone
            ("line 7", "variable"),  # unknown variable
            ("line 8", "value"),  # missing value
            ("line 9", "value"),  # non-numeric
            ("line 10", "unit"),  # wrong dimension
            ("line 11", "unit"),  # unknown unit
            ("line 12", "time"),  # unparsable timestamp
            ("line 13", "time"),  # negative time
            ("line 16", "unit"),  # missing unit
            ("line 18", "time"),  # conflicting duplicate
            ("line 20", "patient")}  # not in the registry
    assert got == want and len(o.issues) == len(want)
    assert o.n_records == 19 and o.n_imported == 6 and o.n_excluded_no_consent == 1  # dora: consent no
    assert o.n_without_records == 0
    by = {p.pseudonym: p for p in o.patients}
    assert set(by) == {pseudo("anna"), pseudo("ben"), pseudo("carl")}
    t, v = by[pseudo("anna")].obs["glucose"]
    # 6.0 mmol/L * 180.156 g/mol = 1080.936 mg/L = 108.0936 mg/dL (exact arithmetic up to rounding)
    np.testing.assert_allclose(v, [110.0, 108.0936, 120.0], rtol=1e-12)
    np.testing.assert_array_equal(t, [0.0, 5.0, 10.0])
    # 17.2 kPa * 7.500616827 mmHg/kPa
    np.testing.assert_allclose(by[pseudo("ben")].obs["systolic"][1], [128.0, 17.2 * 7.500616827], rtol=1e-12)


def test_messages_never_show_identifiers():
    text = " ".join(str(i) for i in csv_obs().issues)
    for pid in ("anna", "ben", "carl", "dora", "erik"):
        assert pid not in text


def fhir_obs():
    sec = ObservationsSection.model_validate({"path": "bad_bundle.json", "format": "fhir", "time_unit": "min",
                                              "patients": PAT, "variables": {
        "cgm": {"unit": "mg/dL", "loinc": ["99504-3"], "molar_mass": 180.156}, "glucose": {"unit": "mg/dL"},
        "systolic": {"unit": "mm[Hg]"}, "diastolic": {"unit": "mm[Hg]"}, "heart_rate": {"unit": "/min"}}})
    return import_observations(Loaded(), sec)


def test_fhir_bundle_bad_entries_named_good_entries_imported():
    o = fhir_obs()
    got = {(i.record, i.field) for i in o.issues}
    assert got == {("entry 4", "code"), ("entry 5", "unit"), ("entry 6", "time"), ("entry 7", "time"),
                   ("entry 8", "value"), ("entry 9", "effectiveDateTime"), ("entry 10", "status"),
                   ("entry 11", "status"), ("entry 15", "patient"), ("entry 16", "code"),
                   ("entry 17", "resource")}, o.issues
    assert o.n_excluded_no_consent == 1
    assert o.n_without_records == 1  # carl consented but has no Observation in the Bundle
    by = {p.pseudonym: p for p in o.patients}
    t, v = by[pseudo("anna")].obs["cgm"]
    np.testing.assert_array_equal(t, [0.0, 5.0])  # minutes after the patient's first record
    np.testing.assert_allclose(v, [110.0, 6.1 * 18.0156], rtol=1e-12)
    assert by[pseudo("anna")].obs["glucose"][0].tolist() == [7.0]
    ben = by[pseudo("ben")].obs  # blood-pressure panel components + heart rate
    assert (ben["systolic"][1][0], ben["diastolic"][1][0], ben["heart_rate"][1][0]) == (128.0, 82.0, 64.0)


def test_malformed_fhir_json_is_one_clear_error():
    sec = ObservationsSection.model_validate({"path": "malformed_bundle.json", "format": "fhir", "patients": PAT,
                                              "variables": {"glucose": {"unit": "mg/dL"}}})
    with pytest.raises(CohortError, match=r"malformed FHIR JSON: .* at line 2 column"):
        import_observations(Loaded(), sec)


def test_withdrawn_consent_excludes_before_anything_else(tmp_path):
    (tmp_path / "p.csv").write_text("id,consent\nanna,false\nben,true\ncarl,true\ndora,no\nerik,true\n")
    sec = ObservationsSection.model_validate({"path": str(DATA / "bad_obs.csv"), "patients": {**PAT, "path": str(tmp_path / "p.csv")},
                                              "variables": {"glucose": {"unit": "mg/dL"}, "systolic": {"unit": "mm[Hg]"}}})
    o = import_observations(Loaded(), sec)
    assert pseudo("anna") not in {p.pseudonym for p in o.patients}
    assert not any(i.record in ("line 5", "line 6", "line 9") for i in o.issues)  # anna's bad rows: not even checked
    assert o.n_excluded_no_consent == 2


def test_job_schema_errors_name_the_key():
    with pytest.raises(ValidationError, match="unit"):
        ObservationsSection.model_validate({"path": "x", "patients": PAT, "variables": {"glucose": {"unit": "parsec"}}})
    with pytest.raises(ValidationError, match="time_unit"):
        ObservationsSection.model_validate({"path": "x", "time_unit": "mg", "patients": PAT,
                                            "variables": {"glucose": {"unit": "mg/dL"}}})
