"""Synthetic twins with known truth for recovery tests and benchmarks: a long observation CSV, a
consent registry and a calibration job for one-compartment oral PK with combined error.

The truth comes from numpy's PCG64 seeded by `seed`, so a data set is reproducible; the closed
form C(t) = D F ka / (V (ka - k)) (e^{-kt} - e^{-ka t}) gives the noise-free concentrations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TYPICAL = {"ka": 1.2, "CL": 4.0, "V1": 40.0}
OMEGA = np.diag([0.2, 0.1, 0.05])
TIMES = np.array([0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 24.0])
DOSE = 500.0
ERR_ADD, ERR_PROP = 0.05, 0.1


def closed_form(t, D, ka, CL, V):
    k = CL / V
    return D * ka / (V * (ka - k)) * (np.exp(-k * t) - np.exp(-ka * t))


def write_pk_dataset(out: Path, n: int, seed: int = 1, chunk_size: int = 100, population: bool = False,
                     backend: str = "auto") -> tuple[Path, np.ndarray]:
    """Write obs.csv, patients.csv, key and job.toml under `out`; returns (job path, true log params [n, 3])."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mu = np.log([TYPICAL[k] for k in ("ka", "CL", "V1")])
    phi = mu + rng.standard_normal((n, 3)) @ np.linalg.cholesky(OMEGA).T
    ka, CL, V = np.exp(phi).T
    c = closed_form(TIMES[None], DOSE, ka[:, None], CL[:, None], V[:, None])
    y = c + np.sqrt(ERR_ADD ** 2 + (ERR_PROP * c) ** 2) * rng.standard_normal(c.shape)
    lines = ["patient,time,variable,value,unit"]
    for i in range(n):
        pid = f"syn{i:06d}"
        lines.append(f"{pid},0,dose,{DOSE:g},mg")
        lines += [f"{pid},{t:g},conc,{float(v)!r},mg/L" for t, v in zip(TIMES, y[i])]
    (out / "obs.csv").write_text("\n".join(lines) + "\n")
    (out / "patients.csv").write_text("id,consent\n" + "".join(f"syn{i:06d},true\n" for i in range(n)))
    (out / "key").write_text("synthetic-key\n")
    pop = "population = true\npopulation_error = \"proportional\"\n" if population else ""
    err = "proportional = 0.1\n" if population else f"additive = {ERR_ADD}\nproportional = {ERR_PROP}\n"
    (out / "job.toml").write_text(f"""[job]
name = "synthetic-pk"
seed = {seed}
chunk_size = {chunk_size}
backend = "{backend}"
[model]
name = "pk_1cmt"
parameters = {{ F = 1.0 }}
[observations]
path = "obs.csv"
[observations.patients]
path = "patients.csv"
id_column = "id"
consent_column = "consent"
key_file = "key"
[observations.variables.C]
name = "conc"
unit = "mg/L"
[observations.doses]
route = "oral"
[calibration]
parameters = ["ka", "CL", "V1"]
prior = {{ ka = {TYPICAL['ka']}, CL = {TYPICAL['CL']}, V1 = {TYPICAL['V1']} }}
omega = {OMEGA.tolist()}
{pop}[calibration.error.C]
{err}""")
    return out / "job.toml", phi
