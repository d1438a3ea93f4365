"""Batched MAP calibration: kernel sensitivities, Theophylline population/individual fits, recovery.

References: the closed-form one-compartment oral solution (sensitivities by complex-step
differentiation of it, exact to rounding), nlmixr2 SAEM estimates for Theophylline (SOURCES.md),
and synthetic twins with known truth.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engine.calibrate.map_fit import FIT_STATUS, map_fit
from engine.calibrate.population import population_fit
from engine.calibrate.problem import build_problem
from engine.calibrate.sensitivity import augment
from engine.models import get_model
from engine.observations import ObservationsSection, PatientRecords, import_observations
from kernels.compile import c_compiler, ode_kernel
from kernels.ode.integrate_numpy import Events, SolverOptions

DATA = Path(__file__).parent / "data" / "calib"
BACKENDS = ["numpy"] + (["cpu"] if c_compiler() else [])
PK = get_model("pk_1cmt")


def closed_form(t, D, ka, CL, V):
    k = CL / V
    return D * ka / (V * (ka - k)) * (np.exp(-k * t) - np.exp(-ka * t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_sensitivities_match_closed_form(backend):
    sm = augment(PK, ["ka", "CL", "V1", "F"], ["C"])
    m = 3
    th = np.array([[1.5, 0.7, 3.0], [2.8, 5.0, 1.2], [31.5, 20.0, 60.0], [1.0, 0.8, 0.5]])  # ka CL V1 F
    P = np.array([[PK.defaults()[n]] * m for n in PK.parameter_names])
    for i, n in enumerate(["ka", "CL", "V1", "F"]):
        P[PK.parameter_names.index(n)] = th[i]
    D = 320.0
    fi = PK.parameter_names.index("F")
    ev = Events(np.zeros((1, m)), np.zeros((1, m), np.int8), np.zeros((1, m), np.int16), D * P[fi][None].copy())
    ev = sm.events(ev, P, np.full((1, m), fi))
    t = np.array([0.25, 0.5, 1.0, 2.0, 3.5, 5.0, 7.0, 9.0, 12.0, 24.0])
    out, st = ode_kernel(sm.model, backend).run(P, ev, t, SolverOptions(rtol=1e-11, atol=1e-12), sm.record(),
                                                 np.zeros(m, np.int8))
    assert (st == 0).all()
    f, S = sm.split(out)
    h = 1e-30
    for j in range(m):
        x = np.log(th[:, j]).astype(complex)
        for k in range(4):
            xp = x.copy()
            xp[k] += 1j * h
            ka, CL, V, F = np.exp(xp)
            ref = (closed_form(t, D * F, ka, CL, V).imag / h)  # complex step: exact to rounding
            # rtol 1e-11 solve: sensitivities agree to ~1e-8 of the concentration scale
            np.testing.assert_allclose(S[0, k, j], ref, rtol=0, atol=1e-7 * np.abs(f[0, j]).max())
        np.testing.assert_allclose(f[0, j], closed_form(t, D * th[3, j], *th[:3, j]), rtol=1e-8)


def theoph_observations():
    os.environ.setdefault("TWIN_PSEUDONYM_KEY", "test-key-not-secret")

    class Loaded:
        def resolve(self, p):
            return DATA / p

    sec = ObservationsSection.model_validate({
        "path": "theoph_long.csv", "patients": {"path": "theoph_patients.csv", "id_column": "id", "consent_column": "consent"},
        "variables": {"C": {"name": "theophylline", "unit": "mg/L"}}, "doses": {"route": "oral"}})
    return import_observations(Loaded(), sec)


def theoph_problem(backend):
    obs = theoph_observations()
    assert len(obs.patients) == 12 and obs.n_imported == 144 and not obs.issues
    mu, om = np.log([1.5, 2.8, 32.0]), np.diag([0.5, 0.1, 0.05])  # rough starting values
    return build_problem(PK, obs.patients, ["ka", "CL", "V1"], ["C"], {"F": 1.0}, mu, om, [0.7], [0.0], "oral", backend)


@pytest.mark.parametrize("backend", BACKENDS[-1:])
def test_theophylline_population_matches_nlmixr2_saem(backend):
    pop = population_fit(theoph_problem(backend), error="additive")
    assert pop.converged
    ka, CL, V = pop.typical
    # nlmixr2 SAEM (theo_sd, additive error): ka 1.57, CL 2.76, V 31.5, BSV 71.5/27.6/13.4 %CV, add.sd 0.693.
    # Laplace EM maximises a different approximation of the same marginal likelihood and SAEM is
    # stochastic (its printed values carry 3 digits): 3% on typical values and residual sd, 10% on
    # the CVs (the 12-subject data set determines variances to only ~20%). Measured: 1.563, 2.769,
    # 31.48; CV 68.8/26.9/13.6; sd 0.697.
    np.testing.assert_allclose([ka, CL, V], [1.57, 2.76, 31.5], rtol=0.03)
    np.testing.assert_allclose(pop.cv(), [71.5, 27.6, 13.4], rtol=0.10)
    np.testing.assert_allclose(pop.err_add, [0.693], rtol=0.03)
    ind = pop.individual
    assert (ind.status == FIT_STATUS["ok"]).all()
    # individual fits: subject 9 (index 8) is the fast absorber (STS ka 8.9/h; shrunk by the prior)
    assert np.argmax(ind.theta[:, 0]) == 8
    # weighted residuals of an adequate fit: chi2/n near 1 overall (132 obs, 3x12 random effects)
    assert 0.6 < ind.chi2.sum() / ind.n_obs.sum() < 1.2


def test_theophylline_backends_agree():
    if len(BACKENDS) < 2:
        pytest.skip("no C compiler")
    a, b = (map_fit(theoph_problem(be)) for be in BACKENDS)
    # same algorithm, two integrators of the same generated model at rtol 1e-8: estimates agree
    # to ~1e-6 relative (LM stops at 1e-9 relative objective change)
    np.testing.assert_allclose(a.phi, b.phi, atol=1e-5)


def synthetic_pk(n, seed, times):
    """Virtual patients from a known population, observed with combined error."""
    rng = np.random.default_rng(seed)
    mu = np.log([1.2, 4.0, 40.0])
    om = np.diag([0.2, 0.1, 0.05])
    phi = mu + rng.standard_normal((n, 3)) @ np.linalg.cholesky(om).T
    ka, CL, V = np.exp(phi).T
    a, b = 0.05, 0.1
    pats = []
    for i in range(n):
        c = closed_form(times, 500.0, ka[i], CL[i], V[i])
        y = c + np.sqrt(a * a + (b * c) ** 2) * rng.standard_normal(len(times))
        pats.append(PatientRecords(b"%064d" % i, {"C": (times.copy(), y)}, [(0.0, 500.0)]))
    return pats, phi, mu, om, a, b


@pytest.mark.parametrize("backend", BACKENDS[-1:])
def test_pk_parameter_recovery_and_interval_coverage(backend):
    times = np.array([0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 24.0])
    pats, truth, mu, om, a, b = synthetic_pk(300, 11, times)
    prob = build_problem(PK, pats, ["ka", "CL", "V1"], ["C"], {"F": 1.0}, mu, om, [a], [b], "oral", backend)
    fit = map_fit(prob)
    assert (fit.status == 0).all()
    err = fit.phi - truth
    rel = np.abs(np.expm1(err))
    # 8 samples with 10% proportional error determine CL and V to a few %, ka less well
    med = np.median(rel, axis=0)
    assert med[1] < 0.05 and med[2] < 0.06 and med[0] < 0.15, med
    z = np.abs(err) / fit.sd()
    cover = (z < 1.959964).mean(axis=0)
    # nominal 95% Laplace intervals; 300 patients give a binomial sd of 1.3%: [0.90, 0.99] is
    # > 3 sd wide on both sides and still catches a covariance off by a factor of ~1.5 in variance
    assert ((cover > 0.90) & (cover < 0.99)).all(), cover


def test_uva_padova_recovery_from_noisy_cgm():
    """24 h of CGM every 5 min (Breton–Kovatchev sensor noise, autocorrelated) on 40 synthetic
    type 1 twins; MAP of 4 parameters with the population prior and AR(1) residuals."""
    if "cpu" not in BACKENDS:
        pytest.skip("no C compiler (the numpy reference is too slow for 13-state sensitivities x 40 twins)")
    from dataclasses import replace

    from engine.calibrate.glucose import MODEL, VARIED, clip_cgm, cgm_noise, population, therapy_events
    from engine.calibrate.map_fit import FitProblem

    n = 40
    P = population(n, 5)
    ev = therapy_events(P)
    times = np.arange(5.0, 24 * 60 + 1, 5.0)
    opts = SolverOptions(rtol=1e-6, atol=1e-8)
    g, st = ode_kernel(MODEL, "cpu").run(P, ev, times, opts, ["Gsub"], np.zeros(n, np.int8))
    assert (st == 0).all()
    y = clip_cgm(g[0] + cgm_noise(len(times), n, 9))[None]
    params = list(VARIED)
    pn = MODEL.parameter_names
    truth = np.log(np.array([P[pn.index(p)] for p in params]).T)
    mu = np.log([MODEL.defaults()[p] for p in params])
    om = np.diag([VARIED[p] ** 2 for p in params])
    # sensor noise: sd ~11 mg/dL (measured on these draws), knot correlation 0.7 per 15 min -> tau 42 min
    prob = FitProblem(MODEL, params, ["Gsub"], P.copy(), ev, None, times, y, mu, om, np.array([10.0]),
                      np.array([0.0]), "cpu", opts, err_tau=np.array([-15.0 / np.log(0.7)]))
    fit = map_fit(prob)
    assert (fit.status == 0).all()
    err = fit.phi - truth
    rel = np.median(np.abs(np.expm1(err)), axis=0)
    prior_rel = np.median(np.abs(np.expm1(mu - truth)), axis=0)
    # measured: Vmx 0.19 (prior 0.20), kp2 0.08 (0.17), kabs 0.10 (0.17), kp3 0.05 (0.13): the day
    # of CGM halves the error of kp2, kabs, kp3; Vmx is nearly confounded with kp3 here
    assert (rel[1:] < 0.7 * prior_rel[1:]).all(), (rel, prior_rel)
    cover = (np.abs(err) / fit.sd() < 1.959964).mean(axis=0)
    # nominal 95%; 40 twins give a binomial sd of 3.4%: >= 0.85 per parameter, >= 0.9 pooled
    assert (cover >= 0.85).all() and cover.mean() >= 0.9, cover
    # the same fit ignoring the noise's autocorrelation is overconfident (measured pooled coverage
    # 0.45): the whitening is what makes the intervals honest
    naive = map_fit(replace(prob, err_tau=None))
    assert (np.abs(naive.phi - truth) / naive.sd() < 1.959964).mean() < 0.7


def test_failures_are_flagged_not_dropped():
    """No observations -> prior kept, flagged; a simulation failure -> flagged; the rest fitted."""
    times = np.array([1.0, 2.0, 4.0, 8.0])
    pats, truth, mu, om, a, b = synthetic_pk(3, 2, times)
    pats[1] = PatientRecords(b"%064d" % 1, {}, [(0.0, 500.0)])  # a dose, no concentrations
    prob = build_problem(PK, pats, ["ka", "CL", "V1"], ["C"], {"F": 1.0}, mu, om, [a], [b], "oral", BACKENDS[-1])
    prob.opts = SolverOptions(rtol=1e-8, atol=1e-10, max_steps=5)  # patient 2 cannot finish with 5 steps...
    fit = map_fit(prob, status_in=np.array([0, 0, 0], np.int8))
    assert fit.status.tolist() == [FIT_STATUS["simulation_failed"]] * 3  # ...nor can anyone: all flagged
    prob.opts = SolverOptions(rtol=1e-8, atol=1e-10)
    fit = map_fit(prob)
    assert fit.status.tolist() == [0, FIT_STATUS["no_observations"], 0]
    np.testing.assert_allclose(fit.phi[1], mu, atol=1e-12)  # nothing observed: the MAP is the prior mean
    np.testing.assert_allclose(fit.cov[1], om, rtol=1e-10)  # and the Laplace covariance the prior's


@pytest.mark.parametrize("name,params", [("pk_1cmt", ["ka", "CL", "V1", "F"]),
                                         pytest.param("uva_padova_t1d", ["Vmx", "kp2", "kabs", "kp3"],
                                                      marks=pytest.mark.slow)])  # ~25 s of NVRTC
def test_sensitivity_models_compile_for_cuda(name, params):
    """The augmented models go through the same CUDA code path as any model: NVRTC compiles them
    with the options CuPy's RawModule uses (no GPU needed)."""
    import ctypes

    from tests.test_kernel_parity import NVRTC

    if NVRTC is None:
        pytest.skip("NVRTC (nvidia-cuda-nvrtc) not installed")
    from kernels.ode.codegen_c import kernel_source

    src = kernel_source(augment(get_model(name), params, [get_model(name).output_names[0]]).model).encode()
    prog = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), src, b"sens.cu", 0, None, None) == 0
    opts = (ctypes.c_char_p * 2)(b"--std=c++14", b"-arch=compute_90")
    rc = NVRTC.nvrtcCompileProgram(prog, 2, opts)
    n = ctypes.c_size_t()
    NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    NVRTC.nvrtcGetProgramLog(prog, log)
    NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, log.value.decode()[-2000:]


def test_theophylline_individual_maps_match_scipy_on_closed_form():
    """Each subject's MAP estimate and Laplace covariance against an independent computation:
    scipy.optimize.minimize (BFGS, gtol 1e-10) on the same negative log posterior written with
    the closed-form solution, and the Gauss–Newton Hessian from complex-step Jacobians of it."""
    from scipy.optimize import minimize

    prob = theoph_problem(BACKENDS[-1])
    prob.mu = np.log([1.56, 2.77, 31.5])  # a population prior near the Laplace-EM result
    prob.omega = np.diag([0.39, 0.07, 0.018])
    fit = map_fit(prob)
    Li = np.linalg.inv(np.linalg.cholesky(prob.omega))
    sd = float(prob.err_add[0])
    for i in range(prob.m):
        m = np.isfinite(prob.y[0, i])
        t, y = prob.times[m], prob.y[0, i, m]
        D = float(prob.events.value[0, i])  # the oral dose (F = 1)

        def nlp(ph):
            ka, CL, V = np.exp(ph)
            r = (y - closed_form(t, D, ka, CL, V)) / sd
            rp = Li @ (ph - prob.mu)
            return 0.5 * (r @ r + rp @ rp)

        ref = minimize(nlp, fit.phi[i] + 0.05, method="BFGS", options={"gtol": 1e-10}).x
        # LM stops at a relative objective change of 1e-9: log parameters agree to ~1e-5
        np.testing.assert_allclose(fit.phi[i], ref, atol=2e-5)
        J = np.empty((m.sum(), 3))
        for k in range(3):
            x = fit.phi[i].astype(complex)
            x[k] += 1e-30j
            J[:, k] = -closed_form(t, D, *np.exp(x)).imag / 1e-30 / sd
        cov = np.linalg.inv(J.T @ J + Li.T @ Li)
        # same Gauss–Newton Hessian, sensitivities from the rtol-1e-8 kernel: 1e-5 relative
        np.testing.assert_allclose(fit.cov[i], cov, rtol=1e-5, atol=1e-9)


def test_population_fit_recovers_synthetic_population_proportional_error():
    """Laplace EM on 300 synthetic twins (known population, proportional error 10 %)."""
    times = np.array([0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 24.0])
    rng = np.random.default_rng(21)
    mu, om, b = np.log([1.2, 4.0, 40.0]), np.diag([0.2, 0.1, 0.05]), 0.1
    phi = mu + rng.standard_normal((300, 3)) @ np.linalg.cholesky(om).T
    pats = []
    for i, (ka, CL, V) in enumerate(np.exp(phi)):
        c = closed_form(times, 500.0, ka, CL, V)
        pats.append(PatientRecords(b"%064d" % i, {"C": (times, c * (1 + b * rng.standard_normal(len(times))))},
                                   [(0.0, 500.0)]))
    start = build_problem(PK, pats, ["ka", "CL", "V1"], ["C"], {"F": 1.0}, np.log([2.0, 3.0, 30.0]),
                          np.diag([0.5, 0.5, 0.5]), [0.0], [0.3], "oral", BACKENDS[-1])
    pop = population_fit(start, error="proportional")
    assert pop.converged
    # sampling error of 300 twins: sd(mean log) = sqrt(omega/300) <= 0.026, so 0.06 on log typical
    # values is > 2 sd; variances of 300 draws are known to ~8% (+ Laplace bias): measured omega
    # 0.177/0.091/0.044 (true 0.2/0.1/0.05), proportional sd 0.1005 (true 0.1)
    # the Laplace (FOCE-type) approximation biases the least determined parameter, ka, by ~3 %
    # (measured: -0.031 in log ka vs the sample mean; CL, V within 0.006)
    np.testing.assert_allclose(pop.mu, phi.mean(axis=0), atol=0.045)
    np.testing.assert_allclose(pop.mu, mu, atol=0.06)
    np.testing.assert_allclose(np.diag(pop.omega), np.diag(om), rtol=0.25)
    np.testing.assert_allclose(pop.err_prop, [b], rtol=0.05)
