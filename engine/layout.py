"""What a run's result holds: the variables, their dimensions, dtypes and attributes.

The runner builds one `Layout` per job; the store writes chunks and the master file from it;
analysis reads the master file without it (the file is self-describing).

Master file `RUN.h5` (all per-patient datasets are HDF5 virtual datasets over the shards):

    /                   attrs: provenance (see engine.provenance)
    /patient            (N,)   int64   dimension scale: global patient index
    /time               (T,)   float64 dimension scale, attrs units
    /<output>           (N, T) float64 model outputs at sample times, attrs units, long_name
    /status             (N,)   int8    0 ok, else failure code (flag_values / flag_meanings)
    /arm                (N,)   int16   arm index (flag_values / flag_meanings = arm names)
    /cohort/<name>      (N,)   covariates (float64; categorical as int16 codes with
                                flag_meanings) and individual parameters (float64);
                                cohort/pseudonym (S64) for CSV cohorts
    /biomarkers/<name>  (N,)   float64 per-patient scalars

Root-level outputs make `xarray.open_dataset("RUN.h5", engine="h5netcdf")` a patient × time
dataset; `engine.analysis.open_run` merges the groups into one Dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Per-patient status codes. Stable: they are written into result files.
STATUS_CODES: dict[str, int] = {
    "ok": 0,
    "nonfinite": 1,  # NaN/Inf appeared in the state
    "step_underflow": 2,  # adaptive step size fell below the floor
    "max_steps": 3,  # step budget exhausted
    "invalid_parameter": 4,  # non-finite or non-positive parameter (e.g. from a CSV row)
    "invalid_covariate": 5,  # missing / unparsable covariate in a CSV row
    "excluded": 6,  # screened out by the trial's inclusion/exclusion criteria (not simulated)
}
STATUS_NAMES = {v: k for k, v in STATUS_CODES.items()}


@dataclass(frozen=True)
class VarSpec:
    path: str  # e.g. "C", "status", "cohort/weight", "biomarkers/cmax"
    dims: tuple[str, ...]  # ("patient",) or ("patient", "time")
    dtype: str  # numpy dtype string: "f8", "i1", "i2", "S64", ...
    attrs: dict = field(default_factory=dict)  # units, long_name, flag_values, flag_meanings, ...

    def shape(self, n_patients: int, n_times: int) -> tuple[int, ...]:
        return tuple(n_patients if d == "patient" else n_times for d in self.dims)

    def fill(self):
        """Fill value for not-yet-written or failed entries."""
        k = np.dtype(self.dtype).kind
        return np.nan if k == "f" else (b"" if k == "S" else -1)


@dataclass
class Layout:
    n_patients: int
    time: np.ndarray  # sample times
    time_units: str
    vars: list[VarSpec]
    chunk_size: int
    # extra fixed-size dimensions (e.g. docking: target, mode, atom) and their coordinate values;
    # the row dimension is "patient" for cohorts, "ligand" for docking screens
    dims: dict[str, int] = field(default_factory=dict)
    coords: dict[str, np.ndarray] = field(default_factory=dict)
    row_dim: str = "patient"

    def var(self, path: str) -> VarSpec:
        for v in self.vars:
            if v.path == path:
                return v
        raise KeyError(path)

    def n_chunks(self) -> int:
        return -(-self.n_patients // self.chunk_size)

    def chunk_bounds(self, chunk_id: int) -> tuple[int, int]:
        s = chunk_id * self.chunk_size
        return s, min(s + self.chunk_size, self.n_patients)


def status_attrs() -> dict:
    codes = sorted(STATUS_CODES.items(), key=lambda kv: kv[1])
    return {
        "flag_values": np.array([v for _, v in codes], dtype="i1"),
        "flag_meanings": " ".join(k for k, _ in codes),
        "long_name": "per-patient simulation status",
    }
