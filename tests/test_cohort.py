"""engine.cohort: marginals, copula, IIV, covariate effects, arms, chunk invariance, CSV cohorts.

Statistical checks use fixed seeds (so they are deterministic) and tolerances stated as multiples
of the standard error of the estimate.
"""

import hashlib
import hmac
import pickle
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.special import ndtri

from engine import rng
from engine.cohort import CohortChunk, open_cohort, psd_cholesky
from engine.config import Job, LoadedJob, parse_job
from engine.errors import CohortError
from engine.layout import STATUS_CODES

TYPICAL = dict(CL=5.0, V1=30.0, Q=10.0, V2=50.0, ka=1.2, F=0.8)
OK, BAD_COV, BAD_PAR = (STATUS_CODES[k] for k in ("ok", "invalid_covariate", "invalid_parameter"))

TAIL = """
[[arms]]
name = "placebo"

[outputs]
times = [0.0, 1.0, 2.0]
variables = ["C"]
"""


def load(cohort_toml: str, path: Path = Path("/nonexistent/job.toml"), seed: int = 20240601, tail: str = TAIL,
         schema_only: bool = False) -> LoadedJob:
    """A job for pk_2cmt; `schema_only` skips the model-aware checks of parse_job, to test the
    cohort's own checks on jobs that parse_job would already refuse."""
    text = f'[job]\nname = "t"\nseed = {seed}\n\n[model]\nname = "pk_2cmt"\n\n{cohort_toml}\n{tail}'
    try:
        from engine.models import check_job_against_model  # noqa: F401
    except ImportError:  # model registry not there yet: validate the schema only
        schema_only = True
    if schema_only:
        return LoadedJob(Job.model_validate(tomllib.loads(text)), text, path)
    return parse_job(text, str(path), path)


def cohort(cohort_toml: str, **kw):
    return open_cohort(load(cohort_toml, **kw), TYPICAL)


FULL = """
[cohort]
size = 20000

[cohort.covariates.WT]
distribution = "lognormal"
median = 70
sd_log = 0.25
low = 35
high = 160
unit = "kg"

[cohort.covariates.SEX]
distribution = "categorical"
categories = ["F", "M", "X"]
probabilities = [0.45, 0.5, 0.05]

[cohort.covariates.AGE]
distribution = "normal"
mean = 50
sd = 15
low = 18
high = 85
unit = "year"

[cohort.covariates.HT]
distribution = "normal"
mean = 170
sd = 10
unit = "cm"

[cohort.covariates.CRCL]
distribution = "uniform"
low = 30
high = 150
unit = "mL/min"

[cohort.covariates.SITE]
distribution = "constant"
value = 3

[cohort.correlation]
variables = ["WT", "HT", "AGE", "CRCL"]
matrix = [[1.0, 0.6, 0.1, 0.3],
          [0.6, 1.0, -0.2, 0.2],
          [0.1, -0.2, 1.0, -0.5],
          [0.3, 0.2, -0.5, 1.0]]

[cohort.variability]
parameters = ["CL", "V1", "ka"]
omega = [[0.09, 0.03, 0.0], [0.03, 0.04, 0.0], [0.0, 0.0, 0.16]]

[[cohort.covariate_effects]]
parameter = "CL"
covariate = "WT"
model = "power"
reference = 70
exponent = 0.75

[[cohort.covariate_effects]]
parameter = "V1"
covariate = "WT"
model = "power"
reference = 70
exponent = 1.0

[[cohort.covariate_effects]]
parameter = "CL"
covariate = "SEX"
model = "categorical"
factors = { F = 1.0, M = 1.25, X = 1.1 }

[[cohort.covariate_effects]]
parameter = "CL"
covariate = "CRCL"
model = "linear"
reference = 100
slope = 0.004

[[cohort.covariate_effects]]
parameter = "Q"
covariate = "AGE"
model = "exponential"
reference = 50
slope = -0.01
"""

TWO_ARMS = """
[[arms]]
name = "placebo"
allocation = 1

[[arms]]
name = "active"
allocation = 2

[outputs]
times = [0.0, 1.0]
variables = ["C"]
"""


@pytest.fixture(scope="module")
def full():
    src = cohort(FULL, tail=TWO_ARMS)
    return src, src.chunk(0, src.n)


def _concat(chunks: list[CohortChunk]) -> dict:
    cat = lambda f: np.concatenate([f(c) for c in chunks])  # noqa: E731
    c0 = chunks[0]
    return dict(
        index=cat(lambda c: c.index),
        arm=cat(lambda c: c.arm),
        status=cat(lambda c: c.status),
        **{f"cov.{k}": cat(lambda c, k=k: c.covariates[k]) for k in c0.covariates},
        **{f"par.{k}": cat(lambda c, k=k: c.parameters[k]) for k in c0.parameters},
    )


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit-identical (NaN == NaN here)


# ---------------------------------------------------------------- structure / invariance
def test_chunk_structure(full):
    src, ch = full
    assert src.n == 20000 and src.n_excluded_no_consent == 0
    assert ch.start == 0 and ch.stop == 20000
    np.testing.assert_array_equal(ch.index, np.arange(20000))
    assert ch.index.dtype == np.int64 and ch.arm.dtype == np.int16 and ch.status.dtype == np.int8
    assert list(ch.covariates) == ["WT", "SEX", "AGE", "HT", "CRCL", "SITE"]
    assert ch.covariates["SEX"].dtype == np.int16
    assert all(ch.covariates[k].dtype == np.float64 for k in ("WT", "AGE", "HT", "CRCL", "SITE"))
    assert set(ch.parameters) == set(TYPICAL)
    assert all(v.dtype == np.float64 and v.shape == (20000,) for v in ch.parameters.values())
    assert ch.pseudonym is None
    assert src.categories == {"SEX": ["F", "M", "X"]}
    assert src.covariate_units["WT"] == "kg" and src.covariate_units["SITE"] == ""
    assert np.all(ch.status == OK)
    np.testing.assert_array_equal(ch.parameters["V2"], 50.0)  # untouched parameters stay typical
    np.testing.assert_array_equal(ch.covariates["SITE"], 3.0)


def test_chunk_bounds_do_not_change_any_patient(full):
    src, _ = full
    whole = _concat([src.chunk(0, 100)])
    _assert_same(whole, _concat([src.chunk(0, 37), src.chunk(37, 100)]))
    _assert_same(whole, _concat([src.chunk(i, i + 1) for i in range(100)]))
    # chunk order does not matter either, and an empty chunk is fine
    late = _concat([src.chunk(19990, 20000)])
    _assert_same(late, _concat([src.chunk(19995, 20000), src.chunk(19990, 19995)][::-1]))
    assert src.chunk(5, 5).index.size == 0
    with pytest.raises(ValueError):
        src.chunk(0, 20001)


def test_reopen_is_deterministic_and_seed_matters(full):
    src, ch = full
    again = cohort(FULL, tail=TWO_ARMS)
    _assert_same(_concat([ch]), _concat([again.chunk(0, again.n)]))
    assert again.fingerprint() == src.fingerprint()
    other = cohort(FULL, tail=TWO_ARMS, seed=1)
    assert other.fingerprint() != src.fingerprint()
    assert not np.any(other.chunk(0, 100).covariates["WT"] == ch.covariates["WT"][:100])


def test_fingerprint_tracks_what_changes_the_values():
    base = cohort(FULL)
    assert len(base.fingerprint()) == 64
    assert cohort(FULL.replace("sd_log = 0.25", "sd_log = 0.26")).fingerprint() != base.fingerprint()
    assert open_cohort(load(FULL), {**TYPICAL, "CL": 6.0}).fingerprint() != base.fingerprint()
    assert cohort(FULL, tail=TWO_ARMS).fingerprint() != base.fingerprint()


# ---------------------------------------------------------------- marginals
def test_copula_correlation_on_normal_scores(full):
    src, ch = full
    c, n = ch.covariates, src.n
    names = ["WT", "HT", "AGE", "CRCL"]
    R = np.array([[1.0, 0.6, 0.1, 0.3], [0.6, 1.0, -0.2, 0.2], [0.1, -0.2, 1.0, -0.5], [0.3, 0.2, -0.5, 1.0]])
    mu, s = np.log(70), 0.25
    a_w, b_w = (np.log(35) - mu) / s, (np.log(160) - mu) / s
    a_g, b_g = (18 - 50) / 15, (85 - 50) / 15
    scores = {  # z = Phi^-1(F(x)) with F the (truncated) marginal CDF
        "WT": ndtri(stats.truncnorm.cdf((np.log(c["WT"]) - mu) / s, a_w, b_w)),
        "HT": (c["HT"] - 170) / 10,
        "AGE": ndtri(stats.truncnorm.cdf((c["AGE"] - 50) / 15, a_g, b_g)),
        "CRCL": ndtri((c["CRCL"] - 30) / 120),
    }
    Z = np.column_stack([scores[k] for k in names])
    assert np.all(np.isfinite(Z))
    r = np.corrcoef(Z.T)
    rs = stats.spearmanr(np.column_stack([c[k] for k in names])).statistic
    for i in range(4):
        for j in range(i + 1, 4):
            rho = R[i, j]
            se = (1 - rho**2) / np.sqrt(n)  # SE of a Pearson correlation of normal data
            assert abs(r[i, j] - rho) < 4 * se, (names[i], names[j], r[i, j], rho)
            # Spearman of a Gaussian copula is (6/pi) asin(rho/2); Fisher z SE sqrt(1.06/(n-3))
            rho_s = 6 / np.pi * np.arcsin(rho / 2)
            assert abs(np.arctanh(rs[i, j]) - np.arctanh(rho_s)) < 4 * np.sqrt(1.06 / (n - 3))


def test_truncation_is_exact_and_distribution_right(full):
    src, ch = full
    wt, age = ch.covariates["WT"], ch.covariates["AGE"]
    assert wt.min() >= 35 and wt.max() <= 160
    assert age.min() >= 18 and age.max() <= 85
    # the truncated marginals have the right shape (not just the right bounds)
    assert stats.kstest(age, stats.truncnorm((18 - 50) / 15, (85 - 50) / 15, loc=50, scale=15).cdf).pvalue > 1e-3
    assert stats.kstest(ch.covariates["CRCL"], stats.uniform(30, 120).cdf).pvalue > 1e-3
    assert stats.kstest(ch.covariates["HT"], stats.norm(170, 10).cdf).pvalue > 1e-3


def test_far_tail_truncation_by_inverse_cdf():
    # [mean + 4 sd, mean + 4.5 sd]: rejection sampling would need ~30000 tries per patient
    src = cohort(
        """
[cohort]
size = 5000
[cohort.covariates.X]
distribution = "normal"
mean = 0
sd = 1
low = 4.0
high = 4.5
[cohort.covariates.Y]
distribution = "lognormal"
median = 1
sd_log = 1
low = 0.001
high = 0.01
"""
    )
    c = src.chunk(0, src.n).covariates
    assert c["X"].min() >= 4.0 and c["X"].max() <= 4.5
    assert c["Y"].min() >= 0.001 and c["Y"].max() <= 0.01
    assert stats.kstest(c["X"], stats.truncnorm(4.0, 4.5).cdf).pvalue > 1e-3
    a, b = np.log(0.001), np.log(0.01)
    assert stats.kstest(np.log(c["Y"]), stats.truncnorm(a, b).cdf).pvalue > 1e-3


def test_lognormal_median_and_spread():
    src = cohort(
        """
[cohort]
size = 20000
[cohort.covariates.WT]
distribution = "lognormal"
median = 72.5
sd_log = 0.3
"""
    )
    w = src.chunk(0, src.n).covariates["WT"]
    n = w.size
    lw = np.log(w)
    # SE of a sample median of N(mu, s): sqrt(pi/2) s / sqrt(n)
    assert abs(np.median(lw) - np.log(72.5)) < 4 * np.sqrt(np.pi / 2) * 0.3 / np.sqrt(n)
    assert abs(lw.std() - 0.3) < 4 * 0.3 / np.sqrt(2 * n)


def test_categorical_frequencies(full):
    src, ch = full
    counts = np.bincount(ch.covariates["SEX"], minlength=3)
    assert counts.sum() == src.n
    assert stats.chisquare(counts, np.array([0.45, 0.5, 0.05]) * src.n).pvalue > 1e-3


def test_zero_probability_category_never_drawn():
    src = cohort(
        """
[cohort]
size = 5000
[cohort.covariates.G]
distribution = "categorical"
categories = ["a", "b", "c", "d"]
probabilities = [0.0, 0.3, 0.7, 0.0]
"""
    )
    g = src.chunk(0, src.n).covariates["G"]
    counts = np.bincount(g, minlength=4)
    assert counts[0] == 0 and counts[3] == 0
    assert stats.chisquare(counts[1:3], [1500, 3500]).pvalue > 1e-3


def test_singular_correlation_matrix():
    src = cohort(
        """
[cohort]
size = 2000
[cohort.covariates.A]
distribution = "normal"
mean = 0
sd = 1
[cohort.covariates.B]
distribution = "normal"
mean = 10
sd = 2
[cohort.covariates.C]
distribution = "uniform"
low = 0
high = 1
[cohort.correlation]
variables = ["A", "B", "C"]
matrix = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
"""
    )
    c = src.chunk(0, src.n).covariates
    np.testing.assert_allclose(c["B"], 10 + 2 * c["A"], rtol=0, atol=1e-12)
    assert abs(np.corrcoef(c["A"], c["C"])[0, 1]) < 4 / np.sqrt(2000)


def test_psd_cholesky():
    R = np.array([[1.0, 0.6, 0.1], [0.6, 1.0, -0.2], [0.1, -0.2, 1.0]])
    np.testing.assert_array_equal(psd_cholesky(R), np.linalg.cholesky(R))
    S = np.array([[1.0, -1.0, 0.5], [-1.0, 1.0, -0.5], [0.5, -0.5, 1.0]])  # rank 2
    L = psd_cholesky(S)
    np.testing.assert_allclose(L @ L.T, S, atol=1e-14)
    assert np.all(np.triu(L, 1) == 0) and L[1, 1] == 0
    Z = psd_cholesky(np.zeros((2, 2)))
    assert np.all(Z == 0)
    with pytest.raises(CohortError):
        psd_cholesky(np.array([[1.0, 2.0], [2.0, 1.0]]))


# ---------------------------------------------------------------- parameters
def test_iiv_covariance_matches_omega(full):
    src, ch = full
    c, p = ch.covariates, ch.parameters
    sexf = np.array([1.0, 1.25, 1.1])[c["SEX"]]
    effects = {
        "CL": (c["WT"] / 70) ** 0.75 * sexf * (1 + 0.004 * (c["CRCL"] - 100)),
        "V1": c["WT"] / 70,
        "ka": np.ones(src.n),
    }
    eta = np.column_stack([np.log(p[k] / (TYPICAL[k] * effects[k])) for k in ("CL", "V1", "ka")])
    omega = np.array([[0.09, 0.03, 0.0], [0.03, 0.04, 0.0], [0.0, 0.0, 0.16]])
    cov = np.cov(eta.T)
    se = np.sqrt((np.outer(np.diag(omega), np.diag(omega)) + omega**2) / src.n)  # SE of a sample covariance
    assert np.all(np.abs(cov - omega) < 4 * se), (cov, omega)
    assert np.all(np.abs(eta.mean(0)) < 4 * np.sqrt(np.diag(omega) / src.n))
    # eta is independent of the covariates
    assert abs(np.corrcoef(eta[:, 0], np.log(c["WT"]))[0, 1]) < 4 / np.sqrt(src.n)
    # Q has no eta: exactly typical x exp(slope (AGE - 50))
    np.testing.assert_allclose(p["Q"], 10 * np.exp(-0.01 * (c["AGE"] - 50)), rtol=1e-15)


def test_covariate_effects_exact_without_random_effects():
    cov_block = FULL.split("[cohort.variability]")[0] + FULL.split('omega = [[0.09, 0.03, 0.0], [0.03, 0.04, 0.0], [0.0, 0.0, 0.16]]')[1]
    for variability in (
        "",
        '[cohort.variability]\nparameters = ["CL", "V1"]\nomega = [[0.0, 0.0], [0.0, 0.0]]\n',
    ):
        src = cohort(cov_block.replace("size = 20000", "size = 500") + variability)
        ch = src.chunk(0, src.n)
        c, p = ch.covariates, ch.parameters
        sexf = np.array([1.0, 1.25, 1.1])[c["SEX"]]
        np.testing.assert_allclose(p["V1"], 30 * c["WT"] / 70, rtol=1e-15)
        np.testing.assert_allclose(
            p["CL"], 5 * (c["WT"] / 70) ** 0.75 * sexf * (1 + 0.004 * (c["CRCL"] - 100)), rtol=1e-15
        )
        # allometric scaling for single patients, by hand
        for i in range(3):
            assert p["V1"][i] == pytest.approx(30 * c["WT"][i] / 70, rel=1e-15)


def test_singular_omega_gives_identical_etas():
    src = cohort(
        """
[cohort]
size = 1000
[cohort.variability]
parameters = ["CL", "V1"]
omega = [[0.1, 0.1], [0.1, 0.1]]
"""
    )
    p = src.chunk(0, src.n).parameters
    np.testing.assert_allclose(np.log(p["CL"] / 5), np.log(p["V1"] / 30), rtol=0, atol=1e-12)
    assert np.log(p["CL"] / 5).std() == pytest.approx(np.sqrt(0.1), rel=0.1)


def test_eta_comes_from_the_documented_stream():
    src = cohort(
        """
[cohort]
size = 50
[cohort.variability]
parameters = ["ka", "CL"]
omega = [[0.25, 0.0], [0.0, 0.04]]
"""
    )
    p = src.chunk(10, 50).parameters
    e = rng.normal(20240601, rng.STREAM_IIV, np.arange(10, 50), 2)
    np.testing.assert_allclose(np.log(p["ka"] / 1.2), 0.5 * e[:, 0], rtol=1e-13)
    np.testing.assert_allclose(np.log(p["CL"] / 5.0), 0.2 * e[:, 1], rtol=1e-13)


def test_nonpositive_parameter_flags_only_that_patient():
    src = cohort(
        """
[cohort]
size = 4000
[cohort.covariates.AGE]
distribution = "normal"
mean = 50
sd = 15
[[cohort.covariate_effects]]
parameter = "CL"
covariate = "AGE"
model = "linear"
reference = 50
slope = -0.025
"""
    )
    ch = src.chunk(0, src.n)
    bad = ch.covariates["AGE"] >= 90  # 1 - 0.025 * 40 = 0: CL <= 0
    assert 0 < bad.sum() < 100
    np.testing.assert_array_equal(ch.status == BAD_PAR, bad)
    np.testing.assert_array_equal(ch.status[~bad], OK)


def test_positivity_follows_the_model_flags():
    # pk_2cmt declares Emax with positive=False (an inhibitory drug has Emax < 0): a linear
    # covariate effect may push it through zero without failing the patient; CL may not.
    typical = {**TYPICAL, "E0": 0.0, "Emax": 100.0, "EC50": 2.0, "gamma": 1.0}
    text = """
[cohort]
size = 2000
[cohort.covariates.AGE]
distribution = "uniform"
low = 0
high = 100
[[cohort.covariate_effects]]
parameter = "Emax"
covariate = "AGE"
model = "linear"
reference = 50
slope = -0.04
"""
    for positive in (None, ["CL", "V1", "Q", "V2", "ka", "F", "EC50", "gamma"]):
        ch = open_cohort(load(text), typical, positive=positive).chunk(0, 2000)
        assert np.any(ch.parameters["Emax"] < 0)
        assert np.all(ch.status == OK)
        np.testing.assert_array_equal(ch.parameters["E0"], 0.0)  # 0 is fine where not required > 0
    ch = open_cohort(load(text), typical, positive=["Emax"]).chunk(0, 2000)
    np.testing.assert_array_equal(ch.status == BAD_PAR, ch.parameters["Emax"] <= 0)
    # a parameter unknown to the model falls back to "positive if its typical value is"
    src = open_cohort(load("[cohort]\nsize = 10\n"), {**TYPICAL, "E_K": -77.0})
    assert np.all(src.chunk(0, 10).status == OK)
    src = open_cohort(load("[cohort]\nsize = 10\n"), {**TYPICAL, "CL": float("nan")})
    assert np.all(src.chunk(0, 10).status == BAD_PAR)


def test_arms_follow_allocation(full):
    src, ch = full
    counts = np.bincount(ch.arm, minlength=2)
    assert stats.chisquare(counts, [src.n / 3, 2 * src.n / 3]).pvalue > 1e-3
    u = rng.uniform(20240601, rng.STREAM_ARM, np.arange(100), 1)[:, 0]
    np.testing.assert_array_equal(ch.arm[:100], (u >= 1 / 3).astype(np.int16))
    one = cohort(FULL).chunk(0, 100)
    assert np.all(one.arm == 0)


# ---------------------------------------------------------------- open-time errors
@pytest.mark.parametrize(
    "extra,needle",
    [
        ('[cohort.variability]\nparameters = ["CL", "Vc"]\nomega = [[0.1, 0], [0, 0.1]]\n', "Vc"),
        ('[[cohort.covariate_effects]]\nparameter = "Clearance"\ncovariate = "WT"\nmodel = "power"\n'
         "reference = 70\nexponent = 0.75\n", "Clearance"),
    ],
)
def test_unknown_parameter_names(extra, needle):
    base = '[cohort]\nsize = 10\n[cohort.covariates.WT]\ndistribution = "constant"\nvalue = 70\n'
    with pytest.raises(CohortError) as e:
        open_cohort(load(base + extra, schema_only=True), TYPICAL)
    msg = str(e.value)
    assert needle in msg and "'CL'" in msg and "'V1'" in msg  # names the bad one and the allowed ones


def test_categorical_factor_missing_category():
    text = FULL.replace("factors = { F = 1.0, M = 1.25, X = 1.1 }", "factors = { F = 1.0, M = 1.25 }")
    with pytest.raises(CohortError, match=r"'X'.*SEX"):
        cohort(text)
    text = FULL.replace("factors = { F = 1.0, M = 1.25, X = 1.1 }", "factors = { F = 1.0, M = 1.25, X = 1, Y = 2 }")
    with pytest.raises(CohortError, match="'Y'"):
        cohort(text)


def test_effect_model_must_fit_covariate_kind():
    with pytest.raises(CohortError, match="categorical"):
        cohort(FULL.replace('covariate = "SEX"\nmodel = "categorical"', 'covariate = "WT"\nmodel = "categorical"'))
    bad = FULL.replace(
        'covariate = "AGE"\nmodel = "exponential"', 'covariate = "SEX"\nmodel = "exponential"'
    )
    with pytest.raises(CohortError, match="continuous"):
        cohort(bad)


def test_covariate_named_like_a_parameter_is_refused():
    with pytest.raises(CohortError, match="clash"):
        cohort('[cohort]\nsize = 5\n[cohort.covariates.CL]\ndistribution = "constant"\nvalue = 1\n')


def test_throughput_vectorised():
    # 6 covariates (copula over 4), 3 etas, 4 effects, 2 arms: >= 10^6 patients/minute needs
    # 100k patients in < 6 s; a vectorised build takes well under a second.
    src = cohort(FULL.replace("size = 20000", "size = 100000"), tail=TWO_ARMS)
    t = time.perf_counter()
    src.chunk(0, src.n)
    assert time.perf_counter() - t < 6.0


# ---------------------------------------------------------------- CSV cohorts
KEY = b"s3cret-pseudonym-key-\x00\xff"
IDS = ["MRN-0001-ALPHA", "MRN-0002-BRAVO", "MRN-0003-CHARLIE", "MRN-0004-DELTA", "MRN-0005-ECHO",
       "MRN-0006-FOXTROT", "MRN-0007-GOLF", "MRN-0008-HOTEL"]
CSV = (
    "patient_id,consent,weight_kg,sex,cl_ind\n"
    f"{IDS[0]},yes,70,F,4.5\n"
    f"{IDS[1]},No,82,M,5.1\n"  # excluded
    f"{IDS[2]},TRUE,,M,6.0\n"  # empty weight -> invalid_covariate
    f"{IDS[3]},1,abc,F,3.3\n"  # non-numeric weight -> invalid_covariate
    f"{IDS[4]},y,65,Q,5.5\n"  # unknown category -> invalid_covariate
    f"{IDS[5]},N,90,M,2.0\n"  # excluded
    f"{IDS[6]},Yes,55.5,M,-1\n"  # non-positive parameter -> invalid_parameter
    f"{IDS[7]},false,77,F,5\n"  # excluded
    "\n"
)
CSV_COHORT = """
[cohort.csv]
path = "data/patients.csv"
id_column = "patient_id"
consent_column = "consent"
key_file = "secret/key.bin"

[cohort.csv.covariates.WT]
column = "weight_kg"
unit = "kg"

[cohort.csv.covariates.SEX]
column = "sex"
categories = ["F", "M"]

[cohort.csv.parameters.CL]
column = "cl_ind"

[cohort.variability]
parameters = ["CL", "V1"]
omega = [[0.09, 0.0], [0.0, 0.04]]

[[cohort.covariate_effects]]
parameter = "V1"
covariate = "WT"
model = "power"
reference = 70
exponent = 1.0

[[cohort.covariate_effects]]
parameter = "V1"
covariate = "SEX"
model = "categorical"
factors = { F = 0.9, M = 1.0 }
"""


def write_csv_job(tmp_path: Path, csv_text=CSV, cohort_toml=CSV_COHORT, key=KEY + b"\n", **kw) -> LoadedJob:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "secret").mkdir(exist_ok=True)
    if csv_text is not None:
        (tmp_path / "data" / "patients.csv").write_bytes(csv_text.encode() if isinstance(csv_text, str) else csv_text)
    if key is not None:
        (tmp_path / "secret" / "key.bin").write_bytes(key)
    return load("[cohort]\n" + cohort_toml, path=tmp_path / "job.toml", **kw)


def test_csv_consent_pseudonyms_and_per_patient_status(tmp_path):
    src = open_cohort(write_csv_job(tmp_path), TYPICAL)
    assert src.n == 5 and src.n_excluded_no_consent == 3
    assert src.categories == {"SEX": ["F", "M"]} and src.covariate_units == {"WT": "kg", "SEX": ""}
    ch = src.chunk(0, src.n)
    kept = [IDS[i] for i in (0, 2, 3, 4, 6)]
    want = [hmac.new(KEY, i.encode(), hashlib.sha256).hexdigest() for i in kept]
    assert ch.pseudonym.dtype == np.dtype("S64")
    assert [p.decode() for p in ch.pseudonym] == want
    np.testing.assert_array_equal(ch.status, [OK, BAD_COV, BAD_COV, BAD_COV, BAD_PAR])
    wt = ch.covariates["WT"]
    assert wt.dtype == np.float64 and wt[0] == 70 and np.isnan(wt[1]) and np.isnan(wt[2]) and wt[4] == 55.5
    np.testing.assert_array_equal(ch.covariates["SEX"], np.array([0, 1, 0, -1, 1], dtype=np.int16))
    # the CSV parameter column overrides the computed CL; V1 comes from effects and the patient's eta
    np.testing.assert_array_equal(ch.parameters["CL"], [4.5, 6.0, 3.3, 5.5, -1.0])
    e = rng.normal(20240601, rng.STREAM_IIV, np.arange(5), 2)  # index = row after consent filtering
    np.testing.assert_allclose(ch.parameters["V1"][0], 30 * 0.9 * np.exp(0.2 * e[0, 1]), rtol=1e-14)
    np.testing.assert_allclose(ch.parameters["V1"][4], 30 * 55.5 / 70 * np.exp(0.2 * e[4, 1]), rtol=1e-14)
    assert np.isnan(ch.parameters["V1"][1])  # from the invalid covariate
    np.testing.assert_array_equal(ch.parameters["Q"], 10.0)
    # chunk invariance holds for CSV cohorts as well
    _assert_same(_concat([ch]), _concat([src.chunk(0, 2), src.chunk(2, 3), src.chunk(3, 5)]))
    assert [p.decode() for p in np.concatenate([src.chunk(0, 2).pseudonym, src.chunk(2, 5).pseudonym])] == want


def test_csv_keeps_no_raw_identifier_nor_key(tmp_path):
    src = open_cohort(write_csv_job(tmp_path), TYPICAL)
    blobs = pickle.dumps(src) + pickle.dumps(src.chunk(0, src.n))
    for pid in IDS:
        assert pid.encode() not in blobs
    assert KEY not in blobs and KEY.hex().encode() not in blobs


def test_csv_fingerprint_is_file_hash(tmp_path):
    src = open_cohort(write_csv_job(tmp_path), TYPICAL)
    assert src.fingerprint() == hashlib.sha256(CSV.encode()).hexdigest()
    src2 = open_cohort(write_csv_job(tmp_path, CSV.replace("55.5", "55.6")), TYPICAL)
    assert src2.fingerprint() != src.fingerprint()


def test_csv_key_from_environment(tmp_path, monkeypatch):
    cohort_toml = CSV_COHORT.replace('key_file = "secret/key.bin"', 'key_env = "TEST_TWIN_KEY"')
    monkeypatch.setenv("TEST_TWIN_KEY", "env-key-value")
    src = open_cohort(write_csv_job(tmp_path, cohort_toml=cohort_toml), TYPICAL)
    assert src.chunk(0, 1).pseudonym[0].decode() == hmac.new(b"env-key-value", IDS[0].encode(), hashlib.sha256).hexdigest()
    monkeypatch.delenv("TEST_TWIN_KEY")
    with pytest.raises(CohortError, match="TEST_TWIN_KEY.*(export|set)"):
        open_cohort(write_csv_job(tmp_path, cohort_toml=cohort_toml), TYPICAL)
    monkeypatch.setenv("TEST_TWIN_KEY", "")
    with pytest.raises(CohortError, match="TEST_TWIN_KEY"):
        open_cohort(write_csv_job(tmp_path, cohort_toml=cohort_toml), TYPICAL)


def test_csv_key_file_problems(tmp_path):
    with pytest.raises(CohortError, match=r"key\.bin.*not found"):
        open_cohort(write_csv_job(tmp_path, key=None), TYPICAL)
    with pytest.raises(CohortError, match=r"key\.bin.*empty"):
        open_cohort(write_csv_job(tmp_path, key=b"\n"), TYPICAL)


def test_csv_missing_column(tmp_path):
    bad = CSV_COHORT.replace('column = "weight_kg"', 'column = "WEIGHT"')
    with pytest.raises(CohortError) as e:
        open_cohort(write_csv_job(tmp_path, cohort_toml=bad), TYPICAL)
    msg = str(e.value)
    assert "'WEIGHT'" in msg and "weight_kg" in msg and "patient_id" in msg


@pytest.mark.parametrize(
    "csv_text,needle",
    [
        (CSV.replace(f"{IDS[3]},1,", f"{IDS[3]},maybe,"), r"line 5.*'maybe'"),
        (CSV.replace(f"{IDS[3]},1,", f"{IDS[3]},,"), r"line 5.*consent"),
        (CSV.replace(IDS[5], IDS[0]), r"duplicate.*lines 2 and 7"),
        (CSV.replace(f"{IDS[2]},", ","), r"line 4.*empty"),
        ("", "empty cohort"),
        ("patient_id,consent,weight_kg,sex,cl_ind\n", "empty cohort"),
        ("patient_id,consent,weight_kg,sex,cl_ind\nA,no,1,F,1\nB,0,2,M,2\n", "empty cohort"),
        (b"patient_id,consent,weight_kg,sex,cl_ind\nA,yes,\xff,F,1\n", "UTF-8"),
        (CSV.replace(f"{IDS[4]},y,65,Q,5.5", f"{IDS[4]},y,65,Q"), r"line 6.*4 fields"),
    ],
)
def test_csv_file_errors(tmp_path, csv_text, needle):
    with pytest.raises(CohortError, match=needle) as e:
        open_cohort(write_csv_job(tmp_path, csv_text), TYPICAL)
    for pid in IDS:  # error messages never echo an identifier
        assert pid not in str(e.value)


def test_csv_missing_file(tmp_path):
    with pytest.raises(CohortError, match=r"patients\.csv.*not found"):
        open_cohort(write_csv_job(tmp_path, None), TYPICAL)


def test_csv_bom_whitespace_and_nonfinite(tmp_path):
    text = "\ufeffpatient_id , consent,weight_kg,sex,cl_ind\n A1 , YES , 80 , M ,inf\nA2,yes,nan,F,2\nA3,yes,1e2,F,0\n"
    src = open_cohort(write_csv_job(tmp_path, text), TYPICAL)
    ch = src.chunk(0, 3)
    assert ch.pseudonym[0].decode() == hmac.new(KEY, b"A1", hashlib.sha256).hexdigest()
    assert ch.covariates["WT"][0] == 80 and ch.covariates["WT"][2] == 100
    np.testing.assert_array_equal(ch.status, [BAD_PAR, BAD_COV, BAD_PAR])
    assert np.isnan(ch.covariates["WT"][1])
