"""Import patient observations: a long CSV or FHIR R4 Bundles of Observation resources.

Long CSV columns: ``patient,time,variable,value,unit``. ``time`` is a number in the job's
``observations.time_unit`` or an ISO 8601 date-time with time zone (then hours relative to the
patient's first record, converted to ``time_unit``). A row whose ``variable`` is the dose name
(``[observations.doses] name``) is a dose: ``value`` is the amount.

FHIR: a Bundle (JSON) of Observation resources (parsed and validated with ``fhir.resources``, R4B
models, which accept R4 content for these fields), mapped by LOINC code (``loinc`` of each
variable, defaults for glucose, CGM glucose, blood pressure and heart rate). Blood-pressure panels
(85354-9) contribute their systolic/diastolic components.

Patients: identifiers are replaced by the same keyed HMAC-SHA256 pseudonyms as CSV cohorts and
consent comes from a patient registry CSV read with the cohort's rules (engine.cohort). Records of
patients without consent are dropped (counted); records of patients missing from the registry are
errors. Every bad record (unknown code or variable, unit that does not convert, bad/non-monotone/
duplicate time, missing or non-numeric value, invalid FHIR entry) gives one `Issue` naming the
record and the field; every good record is imported. Identifiers never appear in messages.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from . import units
from .cohort import _CONSENT_FALSE, _CONSENT_TRUE, _parse_csv, _pseudonym_key, _read_bytes
from .config import Name, Pos, Strict
from .errors import CohortError

LOINC = "http://loinc.org"
# Default LOINC codes per common variable: (codes, molar mass g/mol or None)
DEFAULT_LOINC: dict[str, tuple[tuple[str, ...], float | None]] = {
    "glucose": (("2339-0", "2345-7", "15074-8", "14749-6"), 180.156),  # blood / serum-plasma, mass and molar
    "cgm_glucose": (("99504-3",), 180.156),  # glucose in interstitial fluid (CGM)
    "systolic": (("8480-6",), None),
    "diastolic": (("8462-4",), None),
    "heart_rate": (("8867-4",), None),
    "theophylline": (("4049-3",), None),
}
BP_PANEL = "85354-9"
# R4 ObservationStatus value set (fhir.resources does not enforce required bindings)
_STATUSES = ("registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown")


# ---------------------------------------------------------------- job schema
class ObsVariable(Strict):
    """One observed model output: how it is spelled in the CSV and coded in FHIR, and its unit."""

    name: str | None = None  # CSV `variable` value (default: the model output's name)
    loinc: list[str] = Field(default_factory=list)  # FHIR codes (default: DEFAULT_LOINC[name])
    unit: str  # the model's unit: every value is converted to it
    molar_mass: Pos | None = None  # g/mol: allows mass <-> molar concentration


class ObsDoses(Strict):
    name: str = "dose"  # CSV `variable` value of dose rows
    route: Name  # model dose route (e.g. oral)
    unit: str = "mg"


class ObsInput(Strict):
    """Rows that drive a model input (piecewise constant): `amount` rows (e.g. grams of a meal)
    hold the input at `rate` for amount/rate time units; `rate` rows set the input's level from
    their time on (e.g. a basal insulin rate). Values must be in `unit`, the model input's unit
    for `rate` rows, the amount unit for `amount` rows."""

    name: str  # CSV `variable` value
    kind: Literal["amount", "rate"]
    unit: str
    rate: Pos | None = None  # amount rows: delivery rate, in the model input's unit

    @model_validator(mode="after")
    def _rate(self):
        if self.kind == "amount" and self.rate is None:
            raise ValueError("kind 'amount' needs 'rate' (how fast the amount is delivered)")
        if self.kind == "rate" and self.rate is not None:
            raise ValueError("'rate' is only for kind 'amount'")
        return self


class ObsPatients(Strict):
    """Patient registry: identifier and consent (same rules and key as [cohort.csv])."""

    path: str
    id_column: str
    consent_column: str
    key_env: str = "TWIN_PSEUDONYM_KEY"
    key_file: str | None = None


class ObservationsSection(Strict):
    path: str
    format: Literal["csv", "fhir"] = "csv"
    time_unit: str = "h"
    patients: ObsPatients
    variables: Annotated[dict[Name, ObsVariable], Field(min_length=1)]
    doses: ObsDoses | None = None
    inputs: dict[Name, ObsInput] = Field(default_factory=dict)  # model input name -> CSV rows

    @model_validator(mode="after")
    def _units(self):
        if not units.known(self.time_unit) or units.factor(self.time_unit, "h") <= 0:
            raise ValueError(f"time_unit = {self.time_unit!r}: not a time unit (h, min, s, d)")
        for k, v in self.variables.items():
            if not units.known(v.unit):
                raise ValueError(f"variables.{k}.unit = {v.unit!r}: unknown unit")
        if self.doses is not None and not units.known(self.doses.unit):
            raise ValueError(f"doses.unit = {self.doses.unit!r}: unknown unit")
        return self


# ---------------------------------------------------------------- results
@dataclass
class Issue:
    record: str  # "line 12" (CSV) or "entry 3" (FHIR)
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.record}: {self.field}: {self.message}"


@dataclass
class PatientRecords:
    pseudonym: bytes
    obs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # var -> (times, values)
    doses: list[tuple[float, float]] = field(default_factory=list)  # (time, amount in dose unit)
    inputs: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # input -> [(time, value)]


@dataclass
class Observations:
    patients: list[PatientRecords]  # registry order, consenting patients with >= 1 record
    variables: list[str]
    issues: list[Issue]
    n_records: int
    n_imported: int
    n_excluded_no_consent: int
    sha256: str  # of the observation file
    dose_route: str | None = None
    n_without_records: int = 0  # consenting registry patients with no importable record (not twins)


# ---------------------------------------------------------------- registry
def _registry(loaded, spec: ObsPatients) -> dict[str, tuple[bytes, bool, int]]:
    """raw id -> (pseudonym, consent, registry order); raw ids stay inside this module."""
    path = loaded.resolve(spec.path)
    header, rows, lines = _parse_csv(_read_bytes(path, "patient registry (observations.patients.path)"), path)
    col = {h: i for i, h in enumerate(header)}
    for name, where in ((spec.id_column, "id_column"), (spec.consent_column, "consent_column")):
        if name not in col:
            raise CohortError(f"{path}: column {name!r} (observations.patients.{where}) not found; columns: {header}")
    key = _pseudonym_key(loaded, spec)
    out: dict[str, tuple[bytes, bool, int]] = {}
    for order, (row, line) in enumerate(zip(rows, lines)):
        pid = row[col[spec.id_column]].strip()
        c = row[col[spec.consent_column]].strip().lower()
        if not pid:
            raise CohortError(f"{path}: line {line}: empty {spec.id_column!r} (patient identifier)")
        if c not in _CONSENT_TRUE | _CONSENT_FALSE:
            raise CohortError(f"{path}: line {line}: consent column {spec.consent_column!r} has value {c!r}; "
                              "allowed (any case): true/false, yes/no, y/n, 1/0")
        if pid in out:
            raise CohortError(f"{path}: line {line}: duplicate {spec.id_column!r} value (identifier not shown)")
        out[pid] = (hmac.digest(key, pid.encode("utf-8"), "sha256").hex().encode(), c in _CONSENT_TRUE, order)
    del key
    return out


# ---------------------------------------------------------------- shared record handling
@dataclass
class _Raw:
    where: str
    pid: str
    time: float | datetime | None
    var: str  # model variable name or the dose marker
    value: float
    unit: str


_DOSE = "\x00dose"
_INPUT = "\x00input:"


def _number(s) -> float | None:
    try:
        x = float(s)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _parse_time(s: str) -> float | datetime | None:
    x = _number(s)
    if x is not None:
        return x
    try:
        d = datetime.fromisoformat(s.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return d if d.tzinfo is not None else None


class _Collector:
    def __init__(self, sec: ObservationsSection, registry):
        self.sec, self.reg = sec, registry
        self.issues: list[Issue] = []
        self.raw: list[_Raw] = []
        self.n_records = 0
        self.no_consent: set[str] = set()

    def error(self, where: str, fld: str, msg: str) -> None:
        self.issues.append(Issue(where, fld, msg))

    def add(self, where: str, pid: str | None, time, var: str, value, unit: str | None) -> None:
        self.n_records += 1
        if not pid:
            return self.error(where, "patient", "missing patient identifier")
        if pid not in self.reg:
            return self.error(where, "patient", "patient not in the registry (no consent record)")
        if not self.reg[pid][1]:
            self.no_consent.add(pid)
            return None
        if time is None:
            return self.error(where, "time", "missing or unparsable time (a number, or ISO 8601 with time zone)")
        if isinstance(time, float) and time < 0:
            return self.error(where, "time", f"negative time {time}")
        x = _number(value)
        if value is None or (isinstance(value, str) and not value.strip()):
            return self.error(where, "value", "missing value")
        if x is None:
            return self.error(where, "value", f"not a finite number: {str(value)[:30]!r}")
        if var == _DOSE:
            target, mm, what = self.sec.doses.unit, None, "dose"
        elif var.startswith(_INPUT):
            spec_in = self.sec.inputs[var[len(_INPUT):]]
            if unit is None or str(unit).strip() != spec_in.unit:
                return self.error(where, "unit", f"unit {unit!r}: {spec_in.name} rows must be in {spec_in.unit!r}")
            if x < 0:
                return self.error(where, "value", f"{spec_in.name} value {x} must be >= 0")
            self.raw.append(_Raw(where, pid, time, var, x, str(unit)))
            return None
        else:
            spec = self.sec.variables[var]
            target, mm, what = spec.unit, spec.molar_mass or DEFAULT_LOINC.get(var, ((), None))[1], var
        if unit is None or not str(unit).strip():
            return self.error(where, "unit", f"missing unit (expected one convertible to {target!r} for {what})")
        try:
            f = units.factor(str(unit).strip(), target, mm)
        except units.UnitError as e:
            return self.error(where, "unit", f"{e} ({what})")
        if var == _DOSE and x <= 0:
            return self.error(where, "value", f"dose amount {x} must be > 0")
        self.raw.append(_Raw(where, pid, time, var, x * f, str(unit)))
        return None

    def finish(self, sha: str) -> Observations:
        tu = units.factor("h", self.sec.time_unit)
        by_pid: dict[str, list[_Raw]] = {}
        for r in self.raw:
            by_pid.setdefault(r.pid, []).append(r)
        patients = []
        n_ok = 0
        for pid in sorted(by_pid, key=lambda p: self.reg[p][2]):
            recs = by_pid[pid]
            stamps = [r.time for r in recs if isinstance(r.time, datetime)]
            origin = min(stamps) if stamps else None
            if stamps and len(stamps) != len(recs):
                for r in recs:
                    if not isinstance(r.time, datetime):
                        self.error(r.where, "time", "numeric time mixed with date-times for the same patient")
                recs = [r for r in recs if isinstance(r.time, datetime)]
            pr = PatientRecords(self.reg[pid][0])
            last: dict[str, float] = {}
            seen: dict[tuple[str, float], float] = {}
            keep: dict[str, list[tuple[float, float]]] = {}
            for r in recs:
                t = (r.time - origin).total_seconds() / 3600.0 * tu if origin is not None else float(r.time)
                name = "dose" if r.var == _DOSE else r.var.removeprefix(_INPUT)
                if (r.var, t) in seen:
                    same = seen[(r.var, t)] == r.value
                    self.error(r.where, "time", f"duplicate {name} record at time {t:g}" +
                               ("" if same else " with a different value"))
                    continue
                if r.var in last and t < last[r.var]:
                    self.error(r.where, "time", f"non-monotone time: {name} at {t:g} after {last[r.var]:g}")
                    continue
                seen[(r.var, t)] = r.value
                last[r.var] = t
                keep.setdefault(r.var, []).append((t, r.value))
                n_ok += 1
            for var, tv in keep.items():
                a = np.array(tv, float)
                if var == _DOSE:
                    pr.doses = [(float(t), float(v)) for t, v in a]
                elif var.startswith(_INPUT):
                    pr.inputs[var[len(_INPUT):]] = [(float(t), float(v)) for t, v in a]
                else:
                    pr.obs[var] = (a[:, 0].copy(), a[:, 1].copy())
            if pr.obs or pr.doses or pr.inputs:
                patients.append(pr)
        self.issues.sort(key=_record_order)
        n_consent = sum(1 for v in self.reg.values() if v[1])
        return Observations(patients, list(self.sec.variables), self.issues, self.n_records, n_ok,
                            len(self.no_consent), sha, self.sec.doses.route if self.sec.doses else None,
                            n_consent - len(patients))


def _record_order(i: Issue) -> tuple:
    m = re.match(r"(\w+) (\d+)(.*)", i.record)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else (i.record, 0, "")


# ---------------------------------------------------------------- CSV
def _import_csv(raw: bytes, path: Path, col: _Collector) -> None:
    header, rows, lines = _parse_csv(raw, path)
    need = ["patient", "time", "variable", "value", "unit"]
    missing = [c for c in need if c not in header]
    if missing:
        raise CohortError(f"{path}: observation CSV lacks column(s) {missing}; a long CSV has {need}")
    ix = {h: header.index(h) for h in need}
    names = {(v.name or k): k for k, v in col.sec.variables.items()}
    dose_name = col.sec.doses.name if col.sec.doses else None
    input_names = {v.name: k for k, v in col.sec.inputs.items()}
    for row, line in zip(rows, lines):
        where = f"line {line}"
        g = {h: row[i].strip() for h, i in ix.items()}
        if g["variable"] == dose_name:
            var = _DOSE
        elif g["variable"] in input_names:
            var = _INPUT + input_names[g["variable"]]
        elif g["variable"] in names:
            var = names[g["variable"]]
        else:
            col.n_records += 1
            col.error(where, "variable", f"unknown variable {g['variable'][:40]!r} (known: {sorted(names)}"
                      + (f", dose {dose_name!r})" if dose_name else ")"))
            continue
        col.add(where, g["patient"], _parse_time(g["time"]) if g["time"] else None, var, g["value"], g["unit"])


# ---------------------------------------------------------------- FHIR
def _codes(cc) -> list[str]:
    if cc is None or not cc.coding:
        return []
    return [c.code for c in cc.coding if c.code and (c.system in (None, LOINC))]


def _import_fhir(raw: bytes, path: Path, col: _Collector) -> None:
    from fhir.resources.R4B.observation import Observation
    from pydantic import ValidationError

    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise CohortError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CohortError(f"{path}: malformed FHIR JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        got = doc.get("resourceType") if isinstance(doc, dict) else type(doc).__name__
        raise CohortError(f"{path}: expected a FHIR Bundle, got resourceType {got!r}")
    entries = doc.get("entry") or []
    if not isinstance(entries, list):
        raise CohortError(f"{path}: Bundle.entry must be a list")
    code_map: dict[str, str] = {}
    for k, v in col.sec.variables.items():
        for c in v.loinc or DEFAULT_LOINC.get(k, ((), None))[0]:
            code_map[c] = k
    for n, e in enumerate(entries):
        where = f"entry {n}"
        res = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(res, dict):
            col.n_records += 1
            col.error(where, "resource", "entry without a resource object")
            continue
        if res.get("resourceType") != "Observation":
            continue  # Patients, Devices, ... in the same Bundle are not observations
        try:
            obs = Observation.model_validate(res)
        except ValidationError as err:
            col.n_records += 1
            first = err.errors()[0]
            loc = ".".join(str(x) for x in first["loc"]) or "Observation"
            col.error(where, loc, f"invalid FHIR Observation: {first['msg']}")
            continue
        except ValueError as err:
            col.n_records += 1
            col.error(where, "Observation", f"invalid FHIR Observation: {str(err).splitlines()[0][:120]}")
            continue
        if obs.status not in _STATUSES:
            col.n_records += 1
            col.error(where, "status", f"status {str(obs.status)[:30]!r} is not an R4 ObservationStatus code")
            continue
        if obs.status in ("entered-in-error", "cancelled"):
            col.n_records += 1
            col.error(where, "status", f"status {obs.status!r}: not a valid measurement")
            continue
        ref = obs.subject.reference if obs.subject is not None else None
        pid = ref.split("/", 1)[1] if ref and ref.startswith("Patient/") else None
        when = obs.effectiveDateTime or obs.effectiveInstant or (obs.effectivePeriod.start if obs.effectivePeriod else None)
        t = when if isinstance(when, datetime) and when.tzinfo is not None else None
        parts = []
        codes = _codes(obs.code)
        if BP_PANEL in codes and obs.component:
            for c in obs.component:
                parts.append((_codes(c.code), c.valueQuantity, f"{where}.component"))
        else:
            parts.append((codes, obs.valueQuantity, where))
        for cs, q, w in parts:
            var = next((code_map[c] for c in cs if c in code_map), None)
            if var is None:
                col.n_records += 1
                col.error(w, "code", f"no mapped LOINC code among {cs or 'none'}")
                continue
            value = None if q is None or q.value is None else float(q.value)
            unit = None if q is None else (q.code or q.unit)
            col.add(w, pid, t, var, value, unit)


def import_observations(loaded, sec: ObservationsSection) -> Observations:
    """Read, pseudonymise, consent-filter, convert and check the observations of a job."""
    registry = _registry(loaded, sec.patients)
    path = loaded.resolve(sec.path)
    raw = _read_bytes(path, "observation file (observations.path)")
    col = _Collector(sec, registry)
    (_import_csv if sec.format == "csv" else _import_fhir)(raw, path, col)
    return col.finish(hashlib.sha256(raw).hexdigest())


def issues_frame(obs: Observations) -> pd.DataFrame:
    return pd.DataFrame([{"record": i.record, "field": i.field, "message": i.message} for i in obs.issues],
                        columns=["record", "field", "message"])
