"""Virtual and real (CSV) patient cohorts, built chunk by chunk.

A cohort is a list of patients indexed 0..n-1. For each patient it gives covariates, individual
model parameters, a trial arm and a status. Every random number for patient i comes from
``engine.rng`` counters keyed by (job seed, stream, i), so ``chunk(a, b)`` returns bit-identical
values for a patient whatever chunk bounds, chunk order or rank count are used.

Random draws (the contract a C/CUDA re-implementation must follow):

* STREAM_COVARIATES, draw j: the j-th entry of ``[cohort.covariates]`` in declaration order
  (constants and categoricals keep their slot, so adding a covariate at the end shifts nothing).
  Correlated covariates turn their uniforms into normals e, take z = L e with L the lower
  triangular factor of the correlation matrix (in ``correlation.variables`` order), and map
  u = Phi(z) through their own marginal (the Gaussian copula).
* STREAM_IIV, draw k: the k-th name of ``variability.parameters``; eta = L_omega e.
* STREAM_ARM, draw 0: arm by inverse CDF of the allocation weights (only when > 1 arm).

Individual parameters: P_i = P_typ * prod(covariate effects) * exp(eta_i); a CSV parameter
column replaces the computed value for that patient.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri

from . import rng
from .config import (
    CategoricalDist,
    ConstantDist,
    CovariateEffect,
    CsvCohort,
    LoadedJob,
    LogNormalDist,
    NormalDist,
    UniformDist,
)
from .errors import CohortError
from .layout import STATUS_CODES

# Bump when the mapping from (seed, job) to cohort values changes: it is part of the fingerprint,
# so resuming a run with a different generator is refused.
GENERATOR = "philox4x32-10/u01-open-52/cohort-v1"

_OK = STATUS_CODES["ok"]
_BAD_COV = STATUS_CODES["invalid_covariate"]
_BAD_PAR = STATUS_CODES["invalid_parameter"]

_CONSENT_TRUE = {"true", "yes", "1", "y"}
_CONSENT_FALSE = {"false", "no", "0", "n"}


@dataclass
class CohortChunk:
    start: int
    stop: int
    index: np.ndarray  # int64 global patient indices start..stop-1
    covariates: dict[str, np.ndarray]  # float64 continuous; int16 codes for categorical (-1 invalid)
    parameters: dict[str, np.ndarray]  # float64, one entry per model parameter
    arm: np.ndarray  # int16 index into job.arms
    status: np.ndarray  # int8: 0 ok, invalid_covariate, invalid_parameter
    pseudonym: np.ndarray | None  # 'S64' hex HMAC-SHA256 for CSV cohorts, else None


# ---------------------------------------------------------------- linear algebra
def psd_cholesky(a, what: str = "matrix") -> np.ndarray:
    """Lower-triangular L with L @ L.T == a, for a symmetric positive semi-definite `a`.

    For a positive-definite matrix this is the ordinary (unique) Cholesky factor. A zero pivot --
    a zero variance, or a variable that is a linear combination of earlier ones -- gives a zero
    column instead of a failure, which is the exact factor of the singular matrix. Chosen over an
    eigen decomposition because it is unique (eigenvectors are not, so cohorts could differ
    between LAPACK builds) and trivial to reproduce in C.
    """
    a = np.asarray(a, dtype=np.float64)
    n = a.shape[0]
    L = np.zeros_like(a)
    for j in range(n):
        d = a[j, j] - L[j, :j] @ L[j, :j]
        if d <= 1e-9 * a[j, j] or d <= 0.0:
            continue  # zero pivot: column stays zero
        L[j, j] = math.sqrt(d)
        L[j + 1 :, j] = (a[j + 1 :, j] - L[j + 1 :, :j] @ L[j, :j]) / L[j, j]
    scale = max(float(np.max(np.abs(np.diag(a)))) if n else 0.0, 1e-300)
    if n and not np.allclose(L @ L.T, a, rtol=0, atol=1e-8 * scale):
        raise CohortError(f"{what} is not positive semi-definite (no factor L with L L^T = {what})")
    return L


def lower_mul(L: np.ndarray, e: np.ndarray) -> list[np.ndarray]:
    """Columns of e @ L.T for lower-triangular L, as z_j = sum_{k<=j} L[j,k] e_k in order k=0..j.

    Not a matrix product: BLAS picks kernels and summation orders by array size, so `@` gives
    last-bit differences between a chunk of 37 and a chunk of 100 patients. Element-wise
    multiply-adds in a fixed order are exact IEEE operations, identical for any chunk (and what a
    C/CUDA kernel does, compiled without FMA contraction).
    """
    cols = [np.ascontiguousarray(e[:, k]) for k in range(e.shape[1])]
    out = []
    for j in range(len(cols)):
        acc = L[j, 0] * cols[0]
        for k in range(1, j + 1):
            acc += L[j, k] * cols[k]
        out.append(acc)
    return out


# ---------------------------------------------------------------- marginals
def _trunc_std(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Standard normal truncated to [a, b] by inverse CDF; u = P(Z<z) and v = 1 - u (exact).

    When the interval lies in the upper tail the survival function is used instead of the CDF,
    so a truncation such as [3, inf) keeps full precision instead of subtracting numbers near 1.
    """
    if a > 0:
        pa, pb = ndtr(-a), ndtr(-b)  # pa > pb
        x = -ndtri(pb + v * (pa - pb))
    else:
        pa, pb = ndtr(a), ndtr(b)
        x = ndtri(pa + u * (pb - pa))
    return np.clip(x, a, b)


class _Marginal:
    """Inverse CDF of one continuous covariate, from a uniform or from a copula normal."""

    def __init__(self, dist):
        self.dist = dist
        self.lo, self.hi = -np.inf, np.inf  # truncation in standard-normal units
        if isinstance(dist, NormalDist):
            self.loc, self.scale = dist.mean, dist.sd
            if dist.low is not None:
                self.lo = (dist.low - dist.mean) / dist.sd
            if dist.high is not None:
                self.hi = (dist.high - dist.mean) / dist.sd
        elif isinstance(dist, LogNormalDist):
            self.loc, self.scale = math.log(dist.median), dist.sd_log
            if dist.low is not None and dist.low > 0:
                self.lo = (math.log(dist.low) - self.loc) / self.scale
            if dist.high is not None:
                self.hi = (math.log(dist.high) - self.loc) / self.scale
        self.truncated = bool(np.isfinite(self.lo) or np.isfinite(self.hi))

    def _finish(self, s: np.ndarray) -> np.ndarray:
        d = self.dist
        x = self.loc + self.scale * s
        if isinstance(d, LogNormalDist):
            x = np.exp(x)
        if d.low is not None or d.high is not None:
            # exact bounds even after rounding of loc + scale * s (and exp)
            x = np.clip(x, -np.inf if d.low is None else d.low, np.inf if d.high is None else d.high)
        return x

    def from_u(self, u: np.ndarray) -> np.ndarray:
        d = self.dist
        if isinstance(d, UniformDist):
            return np.clip(d.low + u * (d.high - d.low), d.low, d.high)
        if isinstance(d, ConstantDist):
            return np.full(u.shape, float(d.value))
        if not self.truncated:
            return self._finish(ndtri(u))
        return self._finish(_trunc_std(u, 1.0 - u, self.lo, self.hi))

    def from_z(self, z: np.ndarray) -> np.ndarray:
        if isinstance(self.dist, UniformDist):
            return self.from_u(ndtr(z))
        if not self.truncated:
            return self._finish(z)  # Phi then Phi^-1 would only add rounding
        return self._finish(_trunc_std(ndtr(z), ndtr(-z), self.lo, self.hi))


def _categorical_codes(probabilities: list[float], u: np.ndarray) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    cum = np.cumsum(p) / p.sum()
    codes = np.searchsorted(cum[:-1], u, side="right")
    # rounding in cumsum must never hand a patient to a zero-probability last category
    codes = np.minimum(codes, int(np.flatnonzero(p > 0)[-1]))
    return codes.astype(np.int16)


# ---------------------------------------------------------------- covariate effects
class _Effect:
    def __init__(self, e: CovariateEffect, categories: list[str] | None, where: str):
        self.parameter, self.covariate, self.model = e.parameter, e.covariate, e.model
        if e.model == "categorical":
            if categories is None:
                raise CohortError(
                    f"{where}: model 'categorical' needs a categorical covariate, "
                    f"but {e.covariate!r} is continuous"
                )
            missing = [c for c in categories if c not in e.factors]
            if missing:
                raise CohortError(
                    f"{where}: factors has no entry for categor{'y' if len(missing) == 1 else 'ies'} "
                    f"{missing} of covariate {e.covariate!r} (categories {categories}); give every "
                    f"category a factor (1.0 for the reference)"
                )
            extra = [c for c in e.factors if c not in categories]
            if extra:
                raise CohortError(
                    f"{where}: factors names {extra}, which are not categories of covariate "
                    f"{e.covariate!r} ({categories})"
                )
            # code -1 (invalid CSV cell) indexes the trailing NaN
            self.table = np.array([e.factors[c] for c in categories] + [np.nan])
        else:
            if categories is not None:
                raise CohortError(
                    f"{where}: model {e.model!r} needs a continuous covariate, but {e.covariate!r} "
                    f"is categorical; use model 'categorical' with factors"
                )
            self.reference = float(e.reference)
            self.exponent = e.exponent
            self.slope = e.slope

    def factor(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):  # bad values become non-finite -> invalid_parameter
            if self.model == "categorical":
                return self.table[x]
            if self.model == "power":
                return (x / self.reference) ** self.exponent
            if self.model == "linear":
                return 1.0 + self.slope * (x - self.reference)
            return np.exp(self.slope * (x - self.reference))


# ---------------------------------------------------------------- cohort sources
class CohortSource:
    """Common part of virtual and CSV cohorts: parameters, arms, status."""

    n: int
    n_excluded_no_consent: int = 0
    covariate_units: dict[str, str]
    categories: dict[str, list[str]]

    def __init__(
        self,
        loaded: LoadedJob,
        typical: dict[str, float],
        positive: set[str],
        cov_categories: dict[str, list[str] | None],
    ):
        job = loaded.job
        coh = job.cohort
        self.seed = job.job.seed
        self.typical = {k: float(v) for k, v in typical.items()}
        allowed = sorted(self.typical)

        unknown = []
        if coh.variability is not None:
            unknown += [p for p in coh.variability.parameters if p not in self.typical]
        unknown += [e.parameter for e in coh.covariate_effects if e.parameter not in self.typical]
        if coh.csv is not None:
            unknown += [p for p in coh.csv.parameters if p not in self.typical]
        if unknown:
            raise CohortError(
                f"cohort: unknown model parameter(s) {sorted(set(unknown))} "
                f"(model {job.model.name!r} has {allowed})"
            )
        clash = sorted(set(cov_categories) & (set(self.typical) | {"pseudonym"}))
        if clash:
            raise CohortError(
                f"cohort: covariate name(s) {clash} clash with model parameter names or the reserved "
                f"name 'pseudonym' (results store both under cohort/); rename the covariate"
            )

        self.effects = [
            _Effect(e, cov_categories[e.covariate], f"cohort.covariate_effects[{i}]")
            for i, e in enumerate(coh.covariate_effects)
        ]
        if coh.variability is not None:
            self.iiv_names = list(coh.variability.parameters)
            self.iiv_L = psd_cholesky(coh.variability.omega, "cohort.variability.omega")
        else:
            self.iiv_names, self.iiv_L = [], np.zeros((0, 0))
        # Which individual values must be > 0 (else invalid_parameter); all must be finite.
        self.positive = {k: k in positive for k in self.typical}

        w = np.array([a.allocation for a in job.arms], dtype=np.float64)
        self.arm_cum = np.cumsum(w) / w.sum()

    # -- pieces shared by both sources
    def _check_bounds(self, start: int, stop: int) -> None:
        if not (0 <= start <= stop <= self.n):
            raise ValueError(f"chunk bounds [{start}, {stop}) outside cohort of {self.n} patients")

    def _arms(self, index: np.ndarray) -> np.ndarray:
        if len(self.arm_cum) == 1:
            return np.zeros(index.size, dtype=np.int16)
        u = rng.uniform(self.seed, rng.STREAM_ARM, index, 1)[:, 0]
        return np.searchsorted(self.arm_cum[:-1], u, side="right").astype(np.int16)

    def _parameters(self, index: np.ndarray, covariates: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        m = index.size
        params = {k: np.full(m, v) for k, v in self.typical.items()}
        # bad covariates give NaN/inf here on purpose: _bad_parameters flags those patients
        with np.errstate(all="ignore"):
            for e in self.effects:
                params[e.parameter] *= e.factor(covariates[e.covariate])
            if self.iiv_names:
                e = rng.normal(self.seed, rng.STREAM_IIV, index, len(self.iiv_names))
                for name, eta in zip(self.iiv_names, lower_mul(self.iiv_L, e)):
                    params[name] *= np.exp(eta)
        return params

    def _bad_parameters(self, params: dict[str, np.ndarray], m: int) -> np.ndarray:
        bad = np.zeros(m, dtype=bool)
        for k, p in params.items():
            bad |= ~np.isfinite(p)
            if self.positive[k]:
                bad |= p <= 0
        return bad

    def chunk(self, start: int, stop: int) -> CohortChunk:  # pragma: no cover - abstract
        raise NotImplementedError

    def fingerprint(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class VirtualCohort(CohortSource):
    """Covariates sampled from declared marginals, optionally joined by a Gaussian copula."""

    def __init__(self, loaded: LoadedJob, typical: dict[str, float], positive: set[str]):
        coh = loaded.job.cohort
        self.cov_names = list(coh.covariates)
        cats = {
            k: (list(d.categories) if isinstance(d, CategoricalDist) else None)
            for k, d in coh.covariates.items()
        }
        super().__init__(loaded, typical, positive, cats)
        self._loaded = loaded
        self.n = int(coh.size)
        self.n_excluded_no_consent = 0
        self.covariate_units = {k: d.unit for k, d in coh.covariates.items()}
        self.categories = {k: c for k, c in cats.items() if c is not None}
        self.dists = dict(coh.covariates)
        self.marginals = {
            k: _Marginal(d) for k, d in coh.covariates.items() if not isinstance(d, CategoricalDist)
        }
        if coh.correlation is not None:
            self.corr_names = list(coh.correlation.variables)
            self.corr_L = psd_cholesky(coh.correlation.matrix, "cohort.correlation.matrix")
        else:
            self.corr_names, self.corr_L = [], np.zeros((0, 0))

    def _covariates(self, index: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if not self.cov_names:
            return out
        u = rng.uniform(self.seed, rng.STREAM_COVARIATES, index, len(self.cov_names))
        slot = {k: j for j, k in enumerate(self.cov_names)}
        if self.corr_names:
            e = ndtri(u[:, [slot[k] for k in self.corr_names]])
            z = lower_mul(self.corr_L, e)
            for c, k in enumerate(self.corr_names):
                out[k] = self.marginals[k].from_z(z[c])
        for k in self.cov_names:
            if k in out:
                continue
            d = self.dists[k]
            if isinstance(d, CategoricalDist):
                out[k] = _categorical_codes(d.probabilities, np.ascontiguousarray(u[:, slot[k]]))
            else:
                out[k] = self.marginals[k].from_u(np.ascontiguousarray(u[:, slot[k]]))
        return {k: out[k] for k in self.cov_names}

    def chunk(self, start: int, stop: int) -> CohortChunk:
        self._check_bounds(start, stop)
        index = np.arange(start, stop, dtype=np.int64)
        covs = self._covariates(index)
        params = self._parameters(index, covs)
        status = np.where(self._bad_parameters(params, index.size), _BAD_PAR, _OK).astype(np.int8)
        return CohortChunk(start, stop, index, covs, params, self._arms(index), status, None)

    def fingerprint(self) -> str:
        job = self._loaded.job
        spec = {
            "generator": GENERATOR,
            "seed": job.job.seed,
            "cohort": job.cohort.model_dump(mode="json"),
            "covariate_order": self.cov_names,  # draw slots follow declaration order
            "arms": [[a.name, a.allocation] for a in job.arms],
            "typical": self.typical,
            "positive": sorted(k for k, v in self.positive.items() if v),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class CsvCohortSource(CohortSource):
    """Real patients from a CSV file: consent-filtered, pseudonymised, per-row validation.

    The file is read once at open time (it is small next to the simulation); raw identifiers
    and the key are used only inside `__init__` and never stored.
    """

    def __init__(self, loaded: LoadedJob, typical: dict[str, float], positive: set[str]):
        spec: CsvCohort = loaded.job.cohort.csv
        cats = {k: (list(c.categories) if c.categories is not None else None) for k, c in spec.covariates.items()}
        super().__init__(loaded, typical, positive, cats)
        self.covariate_units = {k: c.unit for k, c in spec.covariates.items()}
        self.categories = {k: c for k, c in cats.items() if c is not None}
        path = loaded.resolve(spec.path)
        raw = _read_bytes(path, "cohort CSV file")
        self._sha256 = hashlib.sha256(raw).hexdigest()
        header, rows, lines = _parse_csv(raw, path)

        col = {h: i for i, h in enumerate(header)}
        need = [(spec.id_column, "id_column"), (spec.consent_column, "consent_column")]
        need += [(c.column, f"covariates.{k}") for k, c in spec.covariates.items()]
        need += [(c.column, f"parameters.{k}") for k, c in spec.parameters.items()]
        for name, where in need:
            if name not in col:
                raise CohortError(
                    f"{path}: column {name!r} (cohort.csv.{where}) not found; columns present: {header}"
                )
        # column-wise from here on: vectorised string operations, not a Python loop per row
        columns = list(zip(*rows))
        del rows
        cells = lambda name: pd.Series(columns[col[name]], dtype=object).str.strip()  # noqa: E731

        # consent: exclude withdrawn patients before anything else touches their row
        consent = cells(spec.consent_column).str.lower()
        keep = consent.isin(_CONSENT_TRUE).to_numpy()
        unknown = ~(keep | consent.isin(_CONSENT_FALSE).to_numpy())
        if unknown.any():
            r = int(np.flatnonzero(unknown)[0])
            raise CohortError(
                f"{path}: line {lines[r]}: consent column {spec.consent_column!r} has value "
                f"{columns[col[spec.consent_column]][r]!r}; allowed (any case): true/false, yes/no, y/n, 1/0"
            )

        # identifiers: never echoed in messages, replaced by keyed hashes, then dropped
        ids = cells(spec.id_column)
        empty = (ids == "").to_numpy()
        if empty.any():
            r = int(np.flatnonzero(empty)[0])
            raise CohortError(f"{path}: line {lines[r]}: empty {spec.id_column!r} (patient identifier)")
        dup = ids.duplicated(keep=False).to_numpy()
        if dup.any():
            first = int(np.flatnonzero(dup)[0])
            same = np.flatnonzero((ids == ids.iloc[first]).to_numpy())
            raise CohortError(
                f"{path}: duplicate {spec.id_column!r} value at lines {lines[same[0]]} and "
                f"{lines[same[1]]} (identifier not shown)"
            )

        self.n_excluded_no_consent = int((~keep).sum())
        if not keep.any():
            raise CohortError(
                f"{path}: empty cohort: {len(lines)} data row(s), none with consent "
                f"({self.n_excluded_no_consent} excluded)"
            )
        self.n = int(keep.sum())

        key = _pseudonym_key(loaded, spec)
        self.pseudonym = np.array(
            [hmac.digest(key, i.encode("utf-8"), "sha256").hex() for i in ids[keep]], dtype="S64"
        )
        del key, ids

        # covariates: a bad cell invalidates that patient only
        self.cov: dict[str, np.ndarray] = {}
        self.cov_bad = np.zeros(self.n, dtype=bool)
        for k, c in spec.covariates.items():
            v = cells(c.column)[keep]
            if c.categories is not None:
                code = {name: i for i, name in enumerate(c.categories)}
                x = v.map(code).fillna(-1).to_numpy(dtype=np.int16)
                self.cov_bad |= x < 0
            else:
                x = _numbers(v)
                self.cov_bad |= ~np.isfinite(x)
                x[~np.isfinite(x)] = np.nan  # "inf" parses, but is as invalid as an empty cell
            self.cov[k] = x
        # individual parameter values (override the population model); checked with the rest
        self.par = {k: _numbers(cells(c.column)[keep]) for k, c in spec.parameters.items()}
        del columns

    def chunk(self, start: int, stop: int) -> CohortChunk:
        self._check_bounds(start, stop)
        index = np.arange(start, stop, dtype=np.int64)
        covs = {k: v[start:stop].copy() for k, v in self.cov.items()}
        params = self._parameters(index, covs)
        for k, v in self.par.items():
            params[k] = v[start:stop].copy()
        bad_par = self._bad_parameters(params, index.size)
        bad_cov = self.cov_bad[start:stop]
        status = np.where(bad_cov, _BAD_COV, np.where(bad_par, _BAD_PAR, _OK)).astype(np.int8)
        return CohortChunk(
            start, stop, index, covs, params, self._arms(index), status, self.pseudonym[start:stop].copy()
        )

    def fingerprint(self) -> str:
        return self._sha256


# ---------------------------------------------------------------- CSV helpers
def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CohortError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise CohortError(f"{path}: {what} is a directory") from None
    except PermissionError:
        raise CohortError(f"{path}: {what} not readable (permission denied)") from None
    except OSError as e:
        raise CohortError(f"{path}: {what} cannot be read ({e.strerror})") from None


def _parse_csv(raw: bytes, path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, data rows and their file line numbers; structural problems are CohortErrors."""
    if not raw.strip():
        raise CohortError(f"{path}: empty cohort: the CSV file is empty")
    try:
        text = raw.decode("utf-8-sig")  # tolerate the BOM spreadsheet programs write
    except UnicodeDecodeError as e:
        raise CohortError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the CSV as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if header is None:
                header = [h.strip() for h in row]
                dup = sorted({h for h in header if header.count(h) > 1})
                if dup:
                    raise CohortError(f"{path}: header repeats column(s) {dup}")
                continue
            if len(row) != len(header):
                raise CohortError(
                    f"{path}: line {reader.line_num}: {len(row)} fields, the header has {len(header)}"
                )
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise CohortError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    if header is None:
        raise CohortError(f"{path}: empty cohort: the CSV file is empty")
    if not rows:
        raise CohortError(f"{path}: empty cohort: the CSV file has a header but no data rows")
    return header, rows, lines


def _numbers(cells: pd.Series) -> np.ndarray:
    """Stripped cells to float64; empty or unparsable cells become NaN (the caller flags them)."""
    return pd.to_numeric(cells, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan, copy=True)


def _pseudonym_key(loaded: LoadedJob, spec: CsvCohort) -> bytes:
    if spec.key_file is not None:
        path = loaded.resolve(spec.key_file)
        key = _read_bytes(path, "pseudonymisation key file (cohort.csv.key_file)").rstrip(b"\r\n")
        if not key:
            raise CohortError(f"{path}: pseudonymisation key file (cohort.csv.key_file) is empty")
        return key
    val = os.environ.get(spec.key_env, "")
    if not val:
        raise CohortError(
            f"environment variable {spec.key_env} is not set (or empty): CSV cohort identifiers are "
            f"pseudonymised with HMAC-SHA256 under a secret key. Set it, e.g. "
            f"`export {spec.key_env}=\"$(cat /path/to/secret.key)\"`, or point cohort.csv.key_file "
            f"at a key file"
        )
    return val.encode("utf-8")


def open_cohort(
    loaded: LoadedJob, typical: dict[str, float], positive: Iterable[str] | None = None
) -> CohortSource:
    """The cohort of a job: CSV when [cohort.csv] is given, else virtual of `cohort.size`.

    `positive`: names of the parameters whose individual values must be > 0 (others need only be
    finite). Default: the model's ``Parameter.positive`` flags when the registry knows the model,
    else every parameter whose typical value is > 0.
    """
    if positive is None:
        positive = _positive_from_model(loaded.job.model.name, typical)
    positive = set(positive)
    if loaded.job.cohort.calibrated is not None:  # fitted twins of real patients (twin calibrate)
        from .calibrate.cohort_source import CalibratedCohortSource

        return CalibratedCohortSource(loaded, typical, positive)
    if loaded.job.cohort.csv is not None:
        return CsvCohortSource(loaded, typical, positive)
    return VirtualCohort(loaded, typical, positive)


def _positive_from_model(name: str, typical: dict[str, float]) -> set[str]:
    try:
        from .models import MODELS

        model = MODELS[name]
    except (ImportError, KeyError):
        return {k for k, v in typical.items() if v > 0}
    flags = {p.name: p.positive for p in model.parameters}
    return {k for k, v in typical.items() if flags.get(k, v > 0)}
