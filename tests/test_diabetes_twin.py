"""Diabetes twin (engine/controllers/diabetes.py) against simglucose 0.2.11.

Reference: tests/data/glucose/simglucose_reference_24h.csv, 30 virtual patients, 24 h, meals of
45/70/80 g at 7/12/18 h, basal-bolus controller, Dexcom CGM with seed 1, Insulet pump
(tests/data/glucose/SOURCES.md); and simglucose_reference_24h_nonoise.csv, the same run with the
sensor noise replaced by 0 (made with tests/data/glucose/make_simglucose_nonoise.py, live
simglucose 0.2.11).

What is compared, and how closely:
  * simglucose's own noise series (np.random.RandomState(1) through the same Johnson-SU/spline
    construction, written out here) injected into the controller: every patient's mean/min/max BG,
    mean CGM and total insulin agree to 2e-4 (the reference keeps 4 decimals: 5e-5) and TIR/TBR/TAR
    exactly. The closed loop — meal announcement and eating, last_Qsto/last_foodtaken, bolus timing
    and CGM averaging, pump rounding — is thus simglucose's.
  * sensor noise off, against the live noise-free simglucose run: the same agreement.
  * the engine's own noise (Philox streams keyed by seed and patient, not RandomState(1)): the CGM
    differs, so correction boluses (CGM > 150 mg/dL at a meal) differ in size, or happen in one run
    and not in the other. Patients whose CGM stays below 150 at their meal steps in both runs agree
    exactly (no correction bolus: the noise only changes the record). For the others the reference
    is one draw of a noise-driven distribution; 40 noise replicates of each patient give that
    distribution, and the reference must lie inside its range (see test_reference_within_noise_spread).
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.interpolate import make_interp_spline

from engine.config import load_job
from engine.controllers import ChunkContext, register
from engine.controllers.diabetes import (
    PUMPS,
    SENSORS,
    BasalBolus,
    BasalBolusSettings,
    CgmNoise,
    meal_plan,
    pump_rates,
    spline_weights,
)
from engine.models import get_model
from engine.parallel import SerialComm
from engine.runner import run

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "glucose"
EXAMPLE = ROOT / "jobs" / "diabetes_example.toml"
GROUPS = ("adolescent", "adult", "child")


# ---------------------------------------------------------------- simglucose's noise series
def simglucose_noise(n: int, seed: int = 1, sensor: str = "Dexcom") -> np.ndarray:
    """The sensor noise simglucose 0.2.11 adds, sample by sample, for one seed: AR(1) normals from
    RandomState(seed) every 15 min, Johnson-SU transform, cubic interpolation (not-a-knot, through
    11 knots, blocks of 150 min sharing their end knot). Element 0 is consumed by the environment's
    first reset read, so the CGM at t = k * sample_time carries element k + 1."""
    p = SENSORS[sensor]
    rs = np.random.RandomState(seed)
    su = lambda e: p["xi"] + p["lambda_"] * np.sinh((e - p["gamma"]) / p["delta"])  # noqa: E731
    e = rs.randn()
    knot = su(e)
    t15 = np.arange(11) * 15.0
    t = np.arange(0.0, 150.0 + 1e-9, p["sample_time"])
    out: list[float] = []
    while len(out) < n:
        ks = [knot]
        for _ in range(10):
            e = p["PACF"] * (e + rs.randn())
            ks.append(su(e))
        knot = ks[-1]
        out.extend(make_interp_spline(t15, np.array(ks), k=3)(t)[1:])
    return np.array(out[:n])


_SG_NOISE = simglucose_noise(1000)


@register
class _SimglucoseNoiseBB(BasalBolus):
    """basal_bolus with simglucose's seed-1 noise series for every patient."""

    name = "test_basal_bolus_simglucose_noise"

    def cgm_noise(self, k):
        return np.full(self.m, _SG_NOISE[k + 1])


# ---------------------------------------------------------------- running jobs
def example_text(controller="basal_bolus", settings="", cohort_csv=None, chunk=30, seed=20240101,
                 backend="cpu") -> str:
    """jobs/diabetes_example.toml with absolute data paths and the given changes."""
    text = EXAMPLE.read_text()
    data = ROOT / "jobs" / "data"
    text = text.replace('path = "data/uva_padova_30.csv"', f'path = "{cohort_csv or data / "uva_padova_30.csv"}"')
    text = text.replace('key_file = "data/', f'key_file = "{data}/')
    text = text.replace('name = "basal_bolus"\nperiod', f'name = "{controller}"\nperiod')
    text = text.replace("chunk_size = 30", f"chunk_size = {chunk}").replace("seed = 20240101", f"seed = {seed}")
    text = text.replace('backend = "cpu"', f'backend = "{backend}"')
    return text.replace('[controller.settings]\n', f"[controller.settings]\n{settings}")


def run_job(tmp_path: Path, name: str, text: str) -> dict[str, np.ndarray]:
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    assert run(load_job(p), tmp_path / name, SerialComm(), quiet=True) == 0
    with h5py.File(tmp_path / name / "RUN.h5", "r") as f:
        out = {k: f[k][:] for k in ("Gsub", "CGM", "insulin", "CHO", "status", "arm")}
        out.update({k: f[f"biomarkers/{k}"][:] for k in f["biomarkers"]})
        out.update({f"cohort/{k}": f[f"cohort/{k}"][:] for k in f["cohort"]})
    assert (out["status"] == 0).all()
    return out


def compare(res: dict, ref: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "patient": ref.patient,
        "mean_BG": res["mean_bg"] - ref.mean_BG, "min_BG": res["min_bg"] - ref.min_BG,
        "max_BG": res["max_bg"] - ref.max_BG, "TIR": res["tir_70_180"] - ref.TIR_70_180_pct,
        "TBR70": res["tbr_70"] - ref.TBR_lt70_pct, "TAR180": res["tar_180"] - ref.TAR_gt180_pct,
        "mean_CGM": res["mean_cgm"] - ref.mean_CGM, "insulin": res["total_insulin"] - ref.total_insulin_U,
    }).set_index("patient")


def reference(name="simglucose_reference_24h.csv") -> pd.DataFrame:
    ref = pd.read_csv(DATA / name)
    names = pd.read_csv(ROOT / "jobs" / "data" / "uva_padova_30.csv").Name
    assert list(ref.patient) == list(names)  # cohort rows are in the reference's order
    return ref


def assert_exact(d: pd.DataFrame) -> None:
    worst = d.abs().max()
    print("\nmax |engine - simglucose| over 30 patients:\n" + worst.to_string())
    for col in ("mean_BG", "min_BG", "max_BG", "mean_CGM"):
        assert worst[col] < 2e-4, col  # mg/dL; the reference has 4 decimals
    for col in ("TIR", "TBR70", "TAR180"):
        assert worst[col] < 1e-3, col  # %; one 3-min step is 0.208 %
    assert worst["insulin"] < 1e-4  # U


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference scenario three ways: simglucose's noise, no noise, the engine's own noise."""
    tmp = tmp_path_factory.mktemp("diabetes")
    return {
        "sgnoise": run_job(tmp, "sgnoise", example_text("test_basal_bolus_simglucose_noise")),
        "nonoise": run_job(tmp, "nonoise", example_text(settings="sensor_noise = false\n")),
        "own": run_job(tmp, "own", example_text()),
    }


# ---------------------------------------------------------------- (a) the reference scenario
def test_reference_exact_with_simglucose_noise(runs):
    assert_exact(compare(runs["sgnoise"], reference()))


def test_reference_exact_without_noise(runs):
    res = runs["nonoise"]
    assert_exact(compare(res, reference("simglucose_reference_24h_nonoise.csv")))
    # without noise the CGM is the clipped Gsub at the sample times, held in between (signals are
    # recorded at control times: the value at t_end is still the one of t_end - 1)
    np.testing.assert_allclose(res["CGM"][:, :-1], np.clip(res["Gsub"][:, :-1], 39, 600), rtol=0, atol=1e-9)


def test_reference_with_engine_noise(runs):
    """The engine's own noise: per-patient differences, and what they come from."""
    ref = reference()
    own, sg = runs["own"], runs["sgnoise"]
    d = compare(own, ref)
    # patients without any correction bolus in either run: the insulin is the same, so BG is the same
    same_insulin = np.abs(own["total_insulin"] - sg["total_insulin"]) < 1e-9
    assert same_insulin.sum() >= 15
    np.testing.assert_allclose(own["mean_bg"][same_insulin], ref.mean_BG[same_insulin], atol=2e-4)
    np.testing.assert_allclose(own["tir_70_180"][same_insulin], ref.TIR_70_180_pct[same_insulin], atol=1e-3)
    lines = []
    for g in GROUPS:
        sel = ref.patient.str.startswith(g + "#").to_numpy()
        bg, tir = d.mean_BG[sel].abs(), d.TIR[sel].abs()
        lines.append(f"{g:10s}: |dmean BG| median {bg.median():.2f}, max {bg.max():.2f} "
                     f"mg/dL; |dTIR| median {tir.median():.2f}, max {tir.max():.2f} points")
    print("\n" + "\n".join(lines))
    # a different noise draw moves mean BG by at most ~10 mg/dL and TIR by ~10 points (see the
    # spread test below for the per-patient distribution this comes from)
    assert d.mean_BG.abs().max() < 15 and d.TIR.abs().max() < 15
    assert d.mean_BG.abs().median() < 1.0 and d.TIR.abs().median() < 1.0
    # the insulin differs by the correction boluses only: at most 2 U a day here
    assert d.insulin.abs().max() < 4


@pytest.mark.slow
def test_reference_within_noise_spread(tmp_path):
    """40 replicates of each virtual patient (distinct patient indices: independent noise) show
    how far sensor noise alone moves the endpoints; simglucose's run (one noise draw) must lie
    inside each patient's replicate range, widened by 1 mg/dL / 1 point."""
    R = 40
    base = pd.read_csv(ROOT / "jobs" / "data" / "uva_padova_30.csv", dtype=str)
    rep = pd.concat([base.assign(Name=base.Name + f"/r{r}") for r in range(R)], ignore_index=True)
    csv = tmp_path / "rep.csv"
    rep.to_csv(csv, index=False)
    res = run_job(tmp_path, "rep", example_text(cohort_csv=csv, chunk=600))
    ref = reference()
    bg = res["mean_bg"].reshape(R, 30)
    tir = res["tir_70_180"].reshape(R, 30)
    lo_bg, hi_bg, lo_tir, hi_tir = bg.min(0), bg.max(0), tir.min(0), tir.max(0)
    table = pd.DataFrame({"ref_BG": ref.mean_BG.to_numpy(), "BG_min": lo_bg, "BG_max": hi_bg, "BG_sd": bg.std(0),
                          "ref_TIR": ref.TIR_70_180_pct.to_numpy(), "TIR_min": lo_tir, "TIR_max": hi_tir},
                         index=ref.patient)
    print("\n" + table.round(2).to_string())
    out_bg = (ref.mean_BG < lo_bg - 1) | (ref.mean_BG > hi_bg + 1)
    out_tir = (ref.TIR_70_180_pct < lo_tir - 1) | (ref.TIR_70_180_pct > hi_tir + 1)
    assert not out_bg.any(), table[out_bg.to_numpy()]
    assert not out_tir.any(), table[out_tir.to_numpy()]


# ---------------------------------------------------------------- (b) pump
def test_pump_tables_match_simglucose_files():
    s = pd.read_csv(DATA / "sensor_params.csv").set_index("Name")
    for name, p in SENSORS.items():
        for k, v in p.items():
            assert s.loc[name, "lambda" if k == "lambda_" else k] == v, (name, k)
    q = pd.read_csv(DATA / "pump_params.csv").set_index("Name")
    for name, p in PUMPS.items():
        for k, v in p.items():
            assert q.loc[name, k] == v, (name, k)
        assert q.loc[name, "sample_time"] == 1.0


def test_pump_increments_round_down_and_clip():
    pump = PUMPS["Insulet"]
    S = 3.0
    # boluses (U over the 3-min step) -> multiples of 0.05 U, rounded down, at most 30 U
    amounts = np.array([0.0, 0.04999, 0.05, 0.07, 1.0, 3.14159, 2.9999999, 29.99, 30.0, 45.0])
    basal, bolus = pump_rates(np.zeros(len(amounts)), amounts / S, pump, "increments", S)
    np.testing.assert_allclose(bolus * S, [0, 0, 0.05, 0.05, 1.0, 3.10, 2.95, 29.95, 30.0, 30.0], atol=1e-12)
    # exact multiples survive the U/min round trip (no loss to floating point)
    for k in range(601):
        _, b = pump_rates(0.0, np.array(k * 0.05) / S, pump, "increments", S)
        assert abs(b * S - k * 0.05) < 1e-9
    # basal (U/min) -> U/h rounded down to 0.05 U/h, at most 30 U/h
    rates_h = np.array([0.0, 0.83, 0.849, 0.85, 1.2345, 40.0])
    b, _ = pump_rates(rates_h / 60, np.zeros(len(rates_h)), pump, "increments", S)
    np.testing.assert_allclose(b * 60, [0, 0.80, 0.80, 0.85, 1.20, 30.0], atol=1e-12)
    assert (b >= 0).all()


def test_pump_simglucose_rounding():
    """simglucose 0.2.11: the increment is applied to the rate in pmol/min (x 6000), to nearest."""
    pump = PUMPS["Insulet"]
    x = np.array([0.0139363, 1.0 / 3.0, 12.5, 31.0, -1.0])
    basal, bolus = pump_rates(x, x, pump, "simglucose", 3.0)
    want = np.clip(np.round(x * 6000 / 0.05) * 0.05 / 6000, 0, 30)
    np.testing.assert_array_equal(basal, want)
    np.testing.assert_array_equal(bolus, want)
    assert np.abs(basal - x)[:3].max() <= 0.025 / 6000  # at most half an increment of 0.05 pmol/min


# ---------------------------------------------------------------- (c) CGM noise
def _su_moments(p, mu_e, var_i, var_j=None, cov_ij=None):
    """E[eps_i], and E[eps_i eps_j] for eps = xi + lambda sinh((e - gamma)/delta), (e_i, e_j) normal."""
    mu = -p["gamma"] / p["delta"]
    s_i, d2 = var_i / p["delta"] ** 2, p["delta"] ** 2
    m_i = p["xi"] + p["lambda_"] * math.sinh(mu) * math.exp(s_i / 2)
    if var_j is None:
        return m_i
    s_j, c = var_j / d2, cov_ij / d2
    m_j = p["xi"] + p["lambda_"] * math.sinh(mu) * math.exp(s_j / 2)
    e_ss = 0.5 * (math.cosh(2 * mu) * math.exp((s_i + s_j + 2 * c) / 2) - math.exp((s_i + s_j - 2 * c) / 2))
    cov = p["lambda_"] ** 2 * (e_ss - math.sinh(mu) ** 2 * math.exp((s_i + s_j) / 2))
    return m_i, m_j, cov


def _knot_cov(p, n_knots):
    """Exact covariance of the Johnson-SU knot values eps_0..eps_{n-1} (e_0 ~ N(0,1), AR(1) after)."""
    rho = p["PACF"]
    var = np.array([rho ** (2 * j) + rho ** 2 * (1 - rho ** (2 * j)) / (1 - rho ** 2) for j in range(n_knots)])
    C = np.empty((n_knots, n_knots))
    mean = np.empty(n_knots)
    for i in range(n_knots):
        mean[i] = _su_moments(p, 0, var[i])
        for j in range(i, n_knots):
            ce = rho ** (j - i) * var[i]
            C[i, j] = C[j, i] = _su_moments(p, 0, var[i], var[j], ce)[2]
    return mean, C, var


def test_cgm_noise_marginal_and_autocorrelation():
    p = SENSORS["Dexcom"]
    m, K = 20000, 60  # patients (independent series) x 3-min samples (1.2 blocks)
    x = CgmNoise(p, seed=11, index=np.arange(m)).series(K + 1)  # samples 0..K, sample k at 3k min
    # knots: samples at multiples of 15 min are the Johnson-SU values themselves; back-transformed
    # they are the AR(1) normals, e_j ~ N(0, v_j), corr(e_j, e_{j+1}) = PACF * sqrt(v_j / v_{j+1})
    # sample k sits at (k + 1) * 3 min of its block's spline time (see CgmNoise)
    W = spline_weights(3.0)  # [50, 11]
    # samples 0..49 are block 0 (knots 0..10), 50..K block 1 (knots 10..20)
    A = np.zeros((K + 1, 21))
    A[:50, :11] = W
    A[50:, 10:21] = W[: K + 1 - 50]
    mean21, C21, var21 = _knot_cov(p, 21)
    mu_x = A @ mean21
    cov_x = A @ C21 @ A.T
    # the knot samples (k = 4, 9, .. at 15, 30, .. min) back-transform to the AR(1) normals
    knots = x[:, 4::5][:, :8]
    e = p["gamma"] + p["delta"] * np.arcsinh((knots - p["xi"]) / p["lambda_"])
    for j in range(8):
        v = var21[j + 1]
        assert abs(e[:, j].mean()) < 4 * math.sqrt(v / m)
        assert abs(e[:, j].var() / v - 1) < 4 * math.sqrt(2 / m)
        # marginal: Johnson SU with a = gamma/s, b = delta/s (x = xi + lambda sinh((s z - gamma)/delta))
        s = math.sqrt(v)
        su = stats.johnsonsu(p["gamma"] / s, p["delta"] / s, loc=p["xi"], scale=p["lambda_"])
        ks = stats.kstest(knots[:, j], su.cdf)
        assert ks.pvalue > 1e-3, (j, ks)
    for j in range(7):
        r = np.corrcoef(e[:, j], e[:, j + 1])[0, 1]
        want = p["PACF"] * math.sqrt(var21[j + 1] / var21[j + 2])
        assert abs(r - want) < 4 * (1 - want ** 2) / math.sqrt(m), (j, r, want)
    # every 3-min sample: mean and variance, and lag-1 autocorrelation of the 3-min series
    # (across both blocks and their junction), against the exact values of the model
    se_mean = np.sqrt(np.diag(cov_x) / m)
    assert (np.abs(x.mean(0) - mu_x) < 4.5 * se_mean).all()
    sd_x = np.sqrt(np.diag(cov_x))
    r_model = np.array([cov_x[k, k + 1] / (sd_x[k] * sd_x[k + 1]) for k in range(K)])
    r_data = np.array([np.corrcoef(x[:, k], x[:, k + 1])[0, 1] for k in range(K)])
    # the sample correlation of non-normal data: SE ~ (1 - r^2) / sqrt(m) x kurtosis factor (< 3)
    assert (np.abs(r_data - r_model) < 4 * 3 * (1 - r_model ** 2) / math.sqrt(m)).all()
    assert r_model.min() > 0.9 and np.median(r_model) > 0.98  # strongly autocorrelated; least at block ends
    # and simglucose's construction (RandomState, scipy's spline) has the same distribution
    sg = np.stack([simglucose_noise(K + 2, seed=s)[1:] for s in range(2000)])
    for k in (0, 24, 49, 50):
        ks = stats.ks_2samp(sg[:, k], x[:, k])
        assert ks.pvalue > 1e-3, (k, ks)


def test_cgm_noise_is_per_patient_and_chunk_independent():
    p = SENSORS["GuardianRT"]
    a = CgmNoise(p, seed=5, index=np.arange(100)).series(200)
    b = CgmNoise(p, seed=5, index=np.arange(40, 60)).series(200)
    np.testing.assert_array_equal(a[40:60], b)
    assert not np.allclose(a[0], a[1])
    c = CgmNoise(p, seed=6, index=np.arange(100)).series(200)
    assert not np.allclose(a, c)
    # the blocks join continuously: the shared knot is the same number on both sides
    n = spline_weights(5.0).shape[0]  # 30 samples per 150-min block
    np.testing.assert_array_equal(a[:, n - 1], CgmNoise(p, 5, np.arange(100)).knots(0)[:, -1])


# ---------------------------------------------------------------- (d) bolus logic
def _ctx(m, t_end, cr, cf, arm=None, seed=1):
    model = get_model("uva_padova_t1d")
    P = np.array([[p.default] * m for p in model.parameters])
    return ChunkContext(model=model, P=P, covariates={"CR": np.asarray(cr, float), "CF": np.asarray(cf, float)},
                        index=np.arange(m), arm=np.zeros(m, np.int16) if arm is None else arm, seed=seed, t_end=t_end)


def _drive(ctl, gsub, t_end, y0=None):
    """Call act() every minute with a prescribed Gsub per patient; returns (u per minute [4, m, T])."""
    m = ctl.m
    y = np.zeros((len(get_model("uva_padova_t1d").states), m)) if y0 is None else y0
    u = np.zeros((4, m))
    us = []
    for t in range(int(t_end)):
        ctl.act(float(t), y, u, {"Gsub": gsub(t)}, np.ones(m, bool))
        us.append(u.copy())
    ctl.finish(float(t_end), y, u, {"Gsub": gsub(int(t_end))}, np.ones(m, bool))
    return np.stack(us, axis=2)


def test_bolus_once_per_meal_with_and_without_correction():
    t_end = 1440
    m = 4
    # patients: BG steady at 120 (no correction), 200 (correction), exactly 150 (none: '> 150'),
    # and 200 with another CR/CF
    cr, cf = [10.0, 10.0, 10.0, 20.0], [40.0, 40.0, 40.0, 30.0]
    level = np.array([120.0, 200.0, 150.0, 200.0])
    s = BasalBolusSettings.model_validate({"meals": [[7.0, 45.0], [12.02, 70.0]], "sensor_noise": False})
    ctl = BasalBolus(s, 1.0, _ctx(m, t_end, cr, cf))
    u = _drive(ctl, lambda t: level.copy(), t_end)
    ins = u[1]  # U/min per minute
    basal = ctl.basal
    extra = ins - basal[:, None]
    # simglucose's pump rounding moves rates by < 5e-6 U/min
    assert np.abs(extra[:, :420]).max() < 1e-5
    bolus_minutes = [np.nonzero(extra[i] > 1e-4)[0] for i in range(m)]
    # meal at 420 (step [420, 423)) -> bolus over [423, 426); meal at 12.02 h = minute 721 (step
    # [720, 723)) -> bolus over [723, 726): each meal once, in the step after its announcement
    for i in range(m):
        assert list(bolus_minutes[i]) == [423, 424, 425, 723, 724, 725], i
    tot = lambda i, a, b: extra[i, a:b].sum()  # noqa: E731
    for i in range(m):
        corr = (level[i] - 140) / cf[i] if level[i] > 150 else 0.0
        assert tot(i, 423, 426) == pytest.approx(45 / cr[i] + corr, abs=5e-5)
        assert tot(i, 723, 726) == pytest.approx(70 / cr[i] + corr, abs=5e-5)
    assert (ctl.result_values()["n_boluses"] == 2).all()
    # eating: 5 g/min from the announcement minute, 45 g = 9 minutes, 70 g = 14 minutes
    cho = u[0]
    assert (np.nonzero(cho[0])[0] == np.r_[420:429, 721:735]).all()
    assert cho[0, 420:429].sum() == 45 and cho[0, 721:735].sum() == 70
    # last_foodtaken counts the current minute; it keeps the meal's total until the next meal
    np.testing.assert_array_equal(u[3][0, 420:430], [5, 10, 15, 20, 25, 30, 35, 40, 45, 45])
    assert u[3][0, 720] == 45 and u[3][0, 721] == 5 and u[3][0, 1439] == 70
    assert ctl.result_values()["total_cho"][0] == 115


def test_bolus_uses_step_averaged_cgm_and_meal_start_stomach():
    """The controller sees the step-averaged CGM ((2 CGM(t-3) + CGM(t)) / 3 for Dexcom), and
    last_Qsto is the stomach content at the minute eating starts."""
    t_end = 30
    model = get_model("uva_padova_t1d")
    s = BasalBolusSettings.model_validate({"meals": [[0.1, 20.0]], "sensor_noise": False,
                                           "pump_rounding": "increments"})
    ctl = BasalBolus(s, 1.0, _ctx(1, t_end, [10.0], [50.0]))
    g = lambda t: np.array([150.0 if t < 6 else 240.0])  # noqa: E731
    y = np.zeros((len(model.states), 1))
    y[0], y[1] = 1000.0, 234.0  # Qsto1 + Qsto2 = 1234 mg left from an earlier meal
    u = _drive(ctl, g, t_end, y0=y)
    # meal at minute 6 (step [6, 9)), bolus over [9, 12): CGM of step [6, 9) = (2*240 + 240)/3 = 240,
    # read at 6 and held at 7 and 8, read again at 9
    # -> 20/10 + (240-140)/50 = 4 U, rounded down to 0.05 U (increments pump)
    extra = u[1, 0] - u[1, 0, 0]
    np.testing.assert_allclose(extra[9:12].sum(), 4.0, atol=1e-12)
    assert (np.abs(extra[:9]) < 1e-12).all() and (np.abs(extra[12:]) < 1e-12).all()
    assert u[2, 0, 6] == 1234.0  # last_Qsto
    assert ctl.result_values()["n_boluses"][0] == 1


def test_bolus_cgm_average_over_the_step():
    """A CGM jump at the end of a step counts 1/3: step [3, 6) with readings 120 (at 3) and 180 (at 6)
    averages (2*120 + 180)/3 = 140, below the correction threshold."""
    s = BasalBolusSettings.model_validate({"meals": [[0.05, 10.0]], "sensor_noise": False,
                                           "pump_rounding": "increments"})
    ctl = BasalBolus(s, 1.0, _ctx(1, 30, [10.0], [20.0]))
    g = lambda t: np.array([120.0 if t < 6 else 180.0])  # noqa: E731
    u = _drive(ctl, g, 30)
    extra = u[1, 0] - u[1, 0, 0]
    np.testing.assert_allclose(extra[6:9].sum(), 1.0, atol=1e-12)  # 10 g / 10 g/U, no correction
    assert ctl.cgm_steps[1][0] == pytest.approx(140.0)


def test_cr_factor_per_arm_and_therapy_table():
    s = BasalBolusSettings.model_validate({"meals": [[1.0, 60.0]], "sensor_noise": False, "cr_factor": [1.0, 0.8],
                                           "pump_rounding": "increments"})
    ctl = BasalBolus(s, 1.0, _ctx(2, 120, [10.0, 10.0], [50.0, 50.0], arm=np.array([0, 1], np.int16)))
    u = _drive(ctl, lambda t: np.array([120.0, 120.0]), 120)
    extra = u[1] - u[1][:, :1]
    np.testing.assert_allclose(extra[:, 63:66].sum(axis=1), [6.0, 7.5], atol=1e-12)
    # CR/CF from a categorical covariate
    tt = {"covariate": "vp", "CR": [10.0, 20.0, 30.0], "CF": [1.0, 2.0, 3.0]}
    s2 = BasalBolusSettings.model_validate({"meals": [[1.0, 60.0]], "therapy_table": tt})
    ctx = _ctx(3, 120, [1, 1, 1], [1, 1, 1])
    ctx.covariates["vp"] = np.array([2, 0, 1], np.int16)
    c2 = BasalBolus(s2, 1.0, ctx)
    np.testing.assert_array_equal(c2.cr, [30.0, 10.0, 20.0])
    np.testing.assert_array_equal(c2.cf, [3.0, 1.0, 2.0])


def test_settings_are_checked(tmp_path):
    from engine.errors import JobError

    meals = "meals = [[7.0, 45.0], [12.0, 70.0], [18.0, 80.0]]"
    bad = [
        (meals, "meals = [[7.0]]", "meals[0]"),
        (meals, "meals = [[25.0, 40.0]]", "repeat_daily"),
        (meals, "", "give 'meals'"),
        ('sensor = "Dexcom"', 'sensor = "Libre"', "controller.settings.sensor"),
        ('pump = "Insulet"', 'pump = "Insulet"\npump_rounding = "up"', "controller.settings.pump_rounding"),
        ('pump = "Insulet"', 'pump = "Insulet"\ncr_factor = []', "controller.settings.cr_factor"),
    ]
    for old, new, want in bad:
        p = tmp_path / "bad.toml"
        p.write_text(example_text().replace(old, new))
        with pytest.raises(JobError, match=re.escape(want)):
            load_job(p)



def test_job_level_checks(tmp_path):
    """BasalBolus.check_job: what pydantic alone cannot see (arms, cohort covariates, output times);
    loading the job (twin validate, twin run) calls it."""
    from engine.errors import JobError

    def check(text):
        p = tmp_path / "j.toml"
        p.write_text(text)
        load_job(p)

    check(example_text())
    cases = [
        ('pump = "Insulet"', 'pump = "Insulet"\ncr_factor = [1.0, 0.8]', "one per arm"),
        ('pump = "Insulet"', 'pump = "Insulet"\ncarb_ratio = "ICR"', "'ICR': no such continuous covariate"),
        ('pump = "Insulet"', 'pump = "Insulet"\ncorrection_factor = "vpatient"', "no such continuous covariate"),
        ("stop = 1440.0, step = 3.0", "stop = 1441.0, step = 1.0", "sample times"),
        ("period = 1.0", "period = 3.0", "period = 1.0"),
        ('pump = "Insulet"', 'pump = "Insulet"\ntherapy_table = { covariate = "vpatient", CR = [1.0], CF = [2.0] }',
         "1 CR/CF entries for the 30 categories"),
        ('pump = "Insulet"', 'pump = "Insulet"\ntherapy_table = { covariate = "age", CR = [1.0], CF = [2.0] }',
         "not a categorical covariate"),
    ]
    for old, new, want in cases:
        with pytest.raises(JobError, match=re.escape(want)):
            check(example_text().replace(old, new))
    check(example_text().replace('pump = "Insulet"', 'pump = "Insulet"\ncarb_ratio = 10.0\ncorrection_factor = 40'))


def test_bad_carb_ratio_fails_that_patient_only(tmp_path):
    base = pd.read_csv(ROOT / "jobs" / "data" / "uva_padova_30.csv", dtype=str)
    base.loc[3, "CR"] = "0"  # adolescent#004
    base.loc[5, "CF"] = ""  # adolescent#006: an empty cell, rejected by the cohort
    csv = tmp_path / "bad.csv"
    base.to_csv(csv, index=False)
    p = tmp_path / "bad.toml"
    p.write_text(example_text(cohort_csv=csv).replace("stop = 1440.0", "stop = 600.0"))
    assert run(load_job(p), tmp_path / "bad", SerialComm(), quiet=True) == 0
    with h5py.File(tmp_path / "bad" / "RUN.h5", "r") as f:
        status = f["status"][:]
        flags = dict(zip(f["status"].attrs["flag_meanings"].split(), f["status"].attrs["flag_values"]))
        bg = f["biomarkers/mean_bg"][:]
    assert status[3] == flags["nonfinite"] and status[5] == flags["invalid_covariate"]
    assert (np.delete(status, [3, 5]) == 0).all() and np.isnan(bg[[3, 5]]).all() and np.isfinite(np.delete(bg, [3, 5])).all()

# ---------------------------------------------------------------- meals
def test_random_meals_distribution_and_reproducibility():
    slot = {"time_h": 7.0, "time_sd_h": 1.0, "grams": 45.0, "grams_sd_log": 0.2, "probability": 0.9}
    s = BasalBolusSettings.model_validate({"random_meals": [slot], "meals": [[12.0, 70.0]]})
    m = 20000
    t_min, g = meal_plan(s, 3, np.arange(m), 3 * 1440.0)
    assert t_min.shape == (m, 6)  # fixed meal on days 1..3, then the random slot on days 1..3
    np.testing.assert_array_equal(t_min[:, :3], np.array([720.0, 2160.0, 3600.0])[None].repeat(m, 0))
    rnd = t_min[:, 3]
    eaten = rnd >= 0
    assert abs(eaten.mean() - 0.9) < 4 * math.sqrt(0.09 / m)
    t = rnd[eaten] / 60
    assert t.min() >= 5 and t.max() <= 9  # truncated to +/- 2 sd
    sd_trunc = math.sqrt(stats.truncnorm(-2, 2).var())
    assert abs(t.mean() - 7) < 4 * sd_trunc / math.sqrt(eaten.sum()) + 1e-3
    assert np.all(rnd[eaten] == np.round(rnd[eaten]))  # whole minutes
    lg = np.log(g[eaten, 3] / 45.0)
    assert abs(lg.mean()) < 4 * 0.2 / math.sqrt(eaten.sum()) and abs(lg.std() / 0.2 - 1) < 0.03
    # day 2 and 3 are new draws, at +1440 / +2880
    d2 = t_min[:, 4]
    assert ((d2[d2 >= 0] >= 1440 + 300) & (d2[d2 >= 0] <= 1440 + 540)).all()
    assert not np.array_equal(d2 - 1440, rnd)
    # a patient's meals depend on nothing but (seed, index)
    t2, g2 = meal_plan(s, 3, np.arange(5000, 5100), 3 * 1440.0)
    np.testing.assert_array_equal(t2, t_min[5000:5100])
    np.testing.assert_array_equal(g2, g[5000:5100])
    # a 1-day run sees the same first day as a 3-day run
    t1, _ = meal_plan(s, 3, np.arange(100), 1440.0)
    np.testing.assert_array_equal(t1, t_min[:100, [0, 3]])


# ---------------------------------------------------------------- (e) reproducibility
RANDOM_SETTINGS = textwrap.dedent("""\
    [[controller.settings.random_meals]]
    time_h = 8.0
    time_sd_h = 0.5
    grams = 50.0
    grams_sd_log = 0.3
""")


def test_same_seed_same_cgm_and_chunking_does_not_matter(tmp_path):
    """10 h with breakfast at 7 h and a random meal at ~8 h; chunks of 30 and of 7 (last one of 2)."""
    def job(chunk=30, seed=20240101):
        return example_text(chunk=chunk, seed=seed).replace("stop = 1440.0", "stop = 600.0") + RANDOM_SETTINGS

    a, b, c, d = (run_job(tmp_path, n, t) for n, t in
                  (("a", job()), ("b", job()), ("c", job(chunk=7)), ("d", job(seed=99))))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        np.testing.assert_array_equal(a[k], c[k], err_msg=k)
    assert not np.array_equal(a["CGM"], d["CGM"])
    assert not np.array_equal(a["total_cho"], d["total_cho"])  # the random meal is per seed and patient
    # breakfast (45 g) and the random meal (7-9 h, all eaten by 10 h)
    assert (a["total_cho"] > 45 + 10).all() and (a["n_boluses"] == 2).all()


def test_numpy_and_cpu_backends_agree(tmp_path):
    a = run_job(tmp_path, "np", example_text(backend="numpy", settings="sensor_noise = false\n"))
    b = run_job(tmp_path, "cpu", example_text(backend="cpu", settings="sensor_noise = false\n"))
    np.testing.assert_allclose(a["Gsub"], b["Gsub"], rtol=1e-7)
    np.testing.assert_allclose(a["mean_bg"], b["mean_bg"], rtol=1e-8)


def test_large_job_reproduces_the_30_patients():
    """diabetes_large's categorical effects and therapy table give each vpatient its own parameters."""
    from engine.runner import make_plan

    loaded = load_job(ROOT / "jobs" / "diabetes_large.toml")
    plan = make_plan(loaded)
    ch = plan.cohort.chunk(0, 3000)
    model = get_model("uva_padova_t1d")
    src = pd.read_csv(ROOT / "jobs" / "data" / "uva_padova_30.csv")
    cats = plan.cohort.categories["vpatient"]
    code = ch.covariates["vpatient"]
    varied = set(loaded.job.cohort.variability.parameters)
    for p in model.parameter_names:
        want = src.set_index("vpatient").loc[[cats[c] for c in code], p].to_numpy(float)
        got = ch.parameters[p]
        if p in varied:
            assert abs(np.median(np.log(got / want))) < 0.02, p
        else:
            np.testing.assert_allclose(got, want, rtol=1e-14, err_msg=p)
    tt = loaded._controller_settings.therapy_table
    assert tt.CR == src.CR.tolist() and tt.CF == src.CF.tolist()
    assert cats == src.vpatient.tolist()
