"""Calibrated twins as the cohort of a later `twin run` (what-if arms on fitted patients)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from engine.calibrate.synthetic import closed_form
from tests.helpers import run_twin

ROOT = Path(__file__).resolve().parents[1]


def whatif(tmp_path: Path, draws: int) -> Path:
    text = (ROOT / "jobs" / "after_calibration" / "theoph_whatif.toml").read_text()
    text = text.replace('run = "../../runs/theoph"', f'run = "{tmp_path / "cal"}"').replace("draws = 20", f"draws = {draws}")
    p = tmp_path / f"whatif{draws}.toml"
    p.write_text(text)
    run_twin("run", p, "-o", tmp_path / f"w{draws}", "-q", check=True)
    return tmp_path / f"w{draws}" / "RUN.h5"


def test_twins_as_cohort_map_and_posterior_draws(tmp_path):
    run_twin("calibrate", ROOT / "jobs" / "theoph_calibrate.toml", "-o", tmp_path / "cal", "-q", check=True)
    with h5py.File(tmp_path / "cal" / "RUN.h5", "r") as f:
        est = {k: f[f"cohort/{k}"][:] for k in ("ka", "CL", "V1")}
        sd = {k: f[f"calibration/{k}_sd_log"][:] for k in ("ka", "CL", "V1")}
        pseud = f["cohort/pseudonym"][:]
    r0 = whatif(tmp_path, 0)
    with h5py.File(r0, "r") as f:
        assert f["cohort/pseudonym"][:].tolist() == pseud.tolist()
        np.testing.assert_array_equal(f["cohort/CL"][:], est["CL"])
        arm, C, t = f["arm"][:], f["C"][:], f["time"][:]
        single = np.nonzero(arm == 0)[0]
        assert single.size
        for i in single:  # the single-dose arm reproduces each twin's fitted curve (closed form, rtol 1e-8 solve)
            ref = closed_form(t, 320.0, est["ka"][i], est["CL"][i], est["V1"][i])
            np.testing.assert_allclose(C[i], ref, rtol=1e-6, atol=1e-8)
    r20 = whatif(tmp_path, 20)
    with h5py.File(r20, "r") as f:
        assert f["patient"].shape == (240,)
        for k in ("ka", "CL", "V1"):
            lv = np.log(f[f"cohort/{k}"][:]).reshape(12, 20)
            z = (lv.mean(axis=1) - np.log(est[k])) / (sd[k] / np.sqrt(20))
            # draws centre on the MAP estimate: |z| < 4 for all 36 (twin, parameter) means
            assert np.abs(z).max() < 4, (k, z)
            ratio = lv.std(axis=1, ddof=1) / sd[k]
            # and spread like the Laplace sd: 20 draws give the sd to ~16%; 0.5..1.6 is > 3 sigma
            assert ((ratio > 0.5) & (ratio < 1.6)).all(), (k, ratio)
        assert (f["status"][:] == 0).all()
