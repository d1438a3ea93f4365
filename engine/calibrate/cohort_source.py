"""Calibrated twins as the cohort of a later `twin run` (`[cohort.calibrated] run = "RUN_DIR"`).

Patient i of the cohort is twin i of the calibration (draws = 0: its MAP estimate), or, with
draws = K, draw i % K of twin i // K from the twin's Laplace posterior N(phi_hat, C) on the log
parameters: phi = phi_hat + L z, z from engine.rng keyed by (job seed, patient index), so a "what
if" arm sees each twin's uncertainty and the draws are the same for any chunking or rank count.
Estimated parameters come from the calibration; the other parameters are the calibration's fixed
values unless the new job sets them in [model.parameters]. Twins whose fit failed keep their
place with status invalid_parameter. Pseudonyms are carried over (never re-identified).
"""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np

from .. import rng
from ..cohort import CohortChunk, CohortSource, lower_mul, psd_cholesky
from ..errors import CohortError
from ..layout import STATUS_CODES


class CalibratedCohortSource(CohortSource):
    def __init__(self, loaded, typical: dict[str, float], positive: set[str]):
        spec = loaded.job.cohort.calibrated
        super().__init__(loaded, typical, positive, {})
        self.covariate_units, self.categories = {}, {}
        p = loaded.resolve(spec.run)
        path = p / "RUN.h5" if p.is_dir() else p
        if not path.is_file():
            raise CohortError(f"cohort.calibrated.run = {spec.run!r}: no RUN.h5 at {path} (run `twin calibrate` first)")
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("kind") != "calibration":
                    raise CohortError(f"cohort.calibrated.run = {spec.run!r}: {path} is not a `twin calibrate` result")
                model = str(f.attrs.get("model"))
                if model != loaded.job.model.name:
                    raise CohortError(f"cohort.calibrated.run = {spec.run!r}: twins of model {model!r}, "
                                      f"this job runs {loaded.job.model.name!r}")
                prior = json.loads(f.attrs["prior"])
                self.estimated = list(prior["parameters"])
                self.values = {k: f[f"cohort/{k}"][:] for k in typical if f"cohort/{k}" in f}
                self.fit_ok = f["status"][:] == 0
                self.pseudonyms = f["cohort/pseudonym"][:]
                k = len(self.estimated)
                C = np.zeros((len(self.fit_ok), k, k))
                for i, a in enumerate(self.estimated):
                    for j in range(i, k):
                        C[:, i, j] = C[:, j, i] = f[f"calibration/cov/{a}__{self.estimated[j]}"][:]
                self.cov = C
                self._digest = str(f.attrs.get("result_sha256", ""))
        except OSError as e:
            raise CohortError(f"cohort.calibrated.run = {spec.run!r}: cannot read {path} ({e})") from None
        fixed_in_job = set(loaded.job.model.parameters)
        self.use = {k: v for k, v in self.values.items() if k in self.estimated or k not in fixed_in_job}
        self.draws = spec.draws
        self.n_twins = len(self.fit_ok)
        self.n = self.n_twins * max(self.draws, 1)
        self.n_excluded_no_consent = 0
        self.seed = loaded.job.job.seed
        self._spec = spec

    def chunk(self, start: int, stop: int) -> CohortChunk:
        self._check_bounds(start, stop)
        index = np.arange(start, stop, dtype=np.int64)
        K = max(self.draws, 1)
        twin = index // K
        params = {k: np.full(index.size, v) for k, v in self.typical.items()}
        for k, v in self.use.items():
            params[k] = v[twin].astype(float)
        status = np.where(self.fit_ok[twin], STATUS_CODES["ok"], STATUS_CODES["invalid_parameter"]).astype(np.int8)
        if self.draws > 0 and self.estimated:
            z = rng.normal(self.seed, rng.STREAM_IIV, index, len(self.estimated))
            for r in range(index.size):
                if status[r] != 0:
                    continue
                L = psd_cholesky(self.cov[twin[r]], "twin posterior covariance")
                eta = [x[0] for x in lower_mul(L, z[r:r + 1])]
                for j, name in enumerate(self.estimated):
                    params[name][r] = params[name][r] * np.exp(eta[j])
        bad = self._bad_parameters(params, index.size)
        status[(status == 0) & bad] = STATUS_CODES["invalid_parameter"]
        return CohortChunk(start, stop, index, {}, params, self._arms(index), status, self.pseudonyms[twin].copy())

    def fingerprint(self) -> str:
        spec = {"calibration_result": self._digest, "draws": self.draws, "seed": self.seed, "typical": self.typical,
                "arm_cum": self.arm_cum.tolist()}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
