"""Monodomain tissue solver (engine/tissue, kernels/tissue): diffusion against analytic solutions of
the heat equation, backend parity, the stability check, plane-wave conduction velocity converging
with dx, and the Niederer 2011 benchmark job at dx 0.5 mm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.errors import JobError
from engine.tissue.geometry import Geometry, box_region, box_shape, diffusivity, max_stable_dt, uniform_fibres
from engine.tissue.simulate import Diverged, simulate
from engine.tissue.solver import Stimulus
from kernels.tissue.build import tissue_kernels
from tests.tissue_helpers import PASSIVE, heat

ROOT = Path(__file__).resolve().parents[1]
TP06 = ROOT / "tests" / "data" / "cardiac" / "ten_tusscher_model_2006_epi.cellml"


def _geom(shape, dx, dl, dt_, fibre=(1.0, 0.0, 0.0), mask=None):
    m = np.ones(shape, bool) if mask is None else mask
    return Geometry(m, uniform_fibres(shape, fibre), dx, dl, dt_)


# ------------------------------------------------------------------------------- diffusion
@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_neumann_cosine_mode_decays_as_the_heat_equation(backend):
    """V0 = cos(pi x / Lx) + cos(2 pi y / Ly) in a no-flux box: each mode decays as exp(-D k^2 t)
    (anisotropic: D_l along x, D_t along y). The scheme's leading error is the eigenvalue's relative
    error k^2 h^2 / 12, i.e. |dV| ~ exp(-D k^2 T) D k^2 T k^2 h^2 / 12 per mode (the forward-Euler time
    error, D k^2 dt / 2 relative, is < 1e-3 of it here); the bound is the sum of that over both modes.
    Halving h must cut the error 4x (second order; 3.5-4.5 accepted)."""
    Lx, Ly, Lz, T = 4.0, 2.0, 0.4, 2.0
    dl, dtr = 0.1, 0.05
    errs = []
    for h in (0.2, 0.1):
        shape = box_shape([Lx, Ly, Lz], h)
        g = _geom(shape, h, dl, dtr)
        x, y, _ = np.meshgrid(*[np.arange(n) * h for n in shape], indexing="ij")
        kx, ky = np.pi / Lx, 2 * np.pi / Ly
        dt = 0.4 * max_stable_dt(g)
        steps = int(round(T / dt))
        dt = T / steps
        v = heat(g, np.cos(kx * x) + np.cos(ky * y), dt, steps, backend)
        exact = np.exp(-dl * kx**2 * T) * np.cos(kx * x) + np.exp(-dtr * ky**2 * T) * np.cos(ky * y)
        errs.append(np.max(np.abs(v - exact)))
        bound = sum(np.exp(-d * k**2 * T) * d * k**2 * T * k**2 * h**2 / 12 for d, k in ((dl, kx), (dtr, ky)))
        assert errs[-1] < bound, (h, errs[-1], bound)
    assert 3.5 < errs[0] / errs[1] < 4.5, errs


def test_rotated_fibres_gaussian_matches_anisotropic_heat_kernel():
    """Fibres at 30 degrees in the x-y plane and 20 degrees out of it exercise all cross terms of
    the 19-point stencil. A Gaussian with covariance S0 spreads as N(0, S0 + 2 D t) (free space;
    it stays > 6 sd from the walls, so the no-flux boundary does not matter: its influence
    ~ exp(-18) ~ 1e-8). Tolerance: 2 % of the peak, for O(h^2) with h = sd/4 (expected ~1 %)."""
    h = 0.1
    shape = box_shape([6.0, 6.0, 4.0], h)
    f = np.array([np.cos(np.radians(30)) * np.cos(np.radians(20)), np.sin(np.radians(30)) * np.cos(np.radians(20)),
                  np.sin(np.radians(20))])
    g = _geom(shape, h, 0.1, 0.02, f)
    D = 0.02 * np.eye(3) + 0.08 * np.outer(f, f)
    c = np.array([3.0, 3.0, 2.0])
    pts = np.stack(np.meshgrid(*[np.arange(n) * h for n in shape], indexing="ij"), -1) - c
    S0 = 0.16 * np.eye(3)

    def gauss(S):
        Si = np.linalg.inv(S)
        q = np.einsum("...i,ij,...j->...", pts, Si, pts)
        return np.exp(-0.5 * q) / np.sqrt(np.linalg.det(S) / np.linalg.det(S0))

    assert g.has_cross()
    dt = 0.4 * max_stable_dt(g)
    T = 1.0
    steps = int(round(T / dt))
    v = heat(g, gauss(S0), T / steps, steps, "cpu")
    exact = gauss(S0 + 2 * D * T)
    assert np.max(np.abs(v - exact)) < 0.02 * exact.max()
    # without the cross terms (fibres along x with the same D_l, D_t) the answer is visibly wrong:
    # the test can tell the cross terms apart
    assert np.max(np.abs(heat(_geom(shape, h, 0.1, 0.02), gauss(S0), T / steps, steps, "cpu") - exact)) > 0.05


def test_mass_conserved_and_constant_kept_on_an_irregular_mask():
    """No-flux: on a box (mirror boundary = vertex-centred Neumann) the trapezoid-weighted integral
    of V is conserved to round-off, and on any mask a constant field stays constant (1e-13)."""
    h = 0.25
    shape = box_shape([3.0, 2.0, 1.0], h)
    g = _geom(shape, h, 0.1, 0.03, (1.0, 1.0, 0.3))
    rng = np.random.default_rng(3)
    v0 = rng.random(shape)
    v = heat(g, v0, 0.3 * max_stable_dt(g), 50)
    w = np.ones(shape)
    for a in range(3):
        idx = [slice(None)] * 3
        for e in (0, -1):
            idx[a] = e
            w[tuple(idx)] *= 0.5
    if not g.has_cross():
        pytest.fail("fibre field should have cross terms")
    # with cross terms the mirror boundary is not exactly conservative: check the diagonal case too
    gd = _geom(shape, h, 0.1, 0.03)
    vd = heat(gd, v0, 0.3 * max_stable_dt(gd), 50)
    assert abs(np.sum(w * vd) - np.sum(w * v0)) < 1e-12 * np.sum(w * v0)
    assert abs(np.sum(w * v) - np.sum(w * v0)) < 2e-3 * np.sum(w * v0)  # cross terms: O(h) boundary leak
    mask = np.ones(shape, bool)
    mask[4:8, 2:6, :] = False  # a hole
    mask[:, -1, -2:] = False
    gm = _geom(shape, h, 0.1, 0.03, (1.0, 1.0, 0.3), mask)
    vc = heat(gm, np.full(shape, -80.0), 0.3 * max_stable_dt(gm), 20)
    assert np.max(np.abs(vc[mask] + 80.0)) < 1e-11


def test_numpy_and_cpu_diffusion_agree_on_irregular_mask_with_cross_terms():
    """Same discretisation in C and NumPy: equal to round-off (1e-12 relative) after 30 steps."""
    h = 0.2
    shape = (9, 7, 5)
    rng = np.random.default_rng(0)
    mask = rng.random(shape) > 0.2
    fib = rng.normal(size=(3, *shape))
    fib /= np.linalg.norm(fib, axis=0)
    g = Geometry(mask, fib, h, 0.1, 0.02)
    v0 = rng.normal(size=shape)
    dt = 0.4 * max_stable_dt(g)
    a, b = heat(g, v0, dt, 30, "cpu"), heat(g, v0, dt, 30, "numpy")
    assert np.max(np.abs(a - b)[mask]) < 1e-12 * np.max(np.abs(v0))


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_overlapping_stimuli_add_their_currents(backend):
    """Three stimuli whose regions overlap (an S2 over part of an S1, as planning's keep_stimuli
    makes them), on the passive membrane dV/dt = -I_stim with diffusion switched off: each voxel's
    V after the pulses is exactly minus the sum of the currents of the stimuli covering it times
    their overlap in time (0.1-ms steps, pulse edges on step boundaries)."""
    from engine.tissue.solver import TissueSolver

    shape = (6, 4, 2)
    g = _geom(shape, 0.25, 0.0, 0.0)
    a = np.zeros(shape, bool)
    a[:4] = True
    b = np.zeros(shape, bool)
    b[2:] = True
    c = np.zeros(shape, bool)
    c[3, 1:3] = True
    st = [Stimulus(a, 0.0, 1.0, -1.0), Stimulus(b, 0.5, 1.0, -2.0), Stimulus(c, 0.0, 2.0, -4.0, period=3.0, count=2)]
    s = TissueSolver(g, PASSIVE, np.zeros(0), tissue_kernels(PASSIVE, backend), st, 0.1)
    for _ in range(40):  # to 4 ms: c pulses again at 3 ms
        s.step()
    V = s.gather(s.Y[s.vidx])
    expect = 1.0 * 1.0 * a + 2.0 * 1.0 * b + 4.0 * 3.0 * c
    np.testing.assert_allclose(V, expect, rtol=1e-12, atol=1e-12)
    assert sorted(np.unique(expect)) == [1.0, 2.0, 3.0, 15.0]  # a, b, a+b, a+b+c (c pulsed twice)


# ------------------------------------------------------------------------------- stability
def test_stability_limit_is_the_real_one():
    """max_stable_dt is sharp for the 7-point stencil: 1.02x the limit blows up a checkerboard
    perturbation, 0.98x keeps it bounded."""
    h = 0.5
    shape = (16, 8, 6)
    g = _geom(shape, h, 0.0953, 0.0126)
    lim = max_stable_dt(g)
    assert lim == pytest.approx(h**2 / (2 * (0.0953 + 2 * 0.0126)), rel=1e-12)
    i, j, k = np.indices(shape)
    v0 = (-1.0) ** (i + j + k) * 1e-3
    assert np.max(np.abs(heat(g, v0, 0.98 * lim, 400))) < 1e-3
    assert np.max(np.abs(heat(g, v0, 1.02 * lim, 400))) > 1.0


def _job(tmp_path: Path, body: str) -> Path:
    import shutil

    (tmp_path / "data").mkdir(exist_ok=True)
    shutil.copy(TP06, tmp_path / "data" / TP06.name)
    p = tmp_path / "job.toml"
    p.write_text(body)
    return p


BENCH = (ROOT / "jobs" / "niederer_benchmark.toml").read_text().replace(
    'file = "data/cardiac/ten_tusscher_model_2006_epi.cellml"', f'file = "data/{TP06.name}"')


def test_stability_check_refuses_unstable_dx_dt(tmp_path):
    from engine.config import load_job
    from engine.tissue.setup import make_plan

    bad = BENCH.replace("dx = 0.5", "dx = 0.1")  # dt 0.05 > limit 0.0415 ms at dx 0.1
    with pytest.raises(JobError, match=r"key 'tissue.dt' = 0.05: unstable for dx = 0.1 mm.*"
                                       r"stability limit 0.041\d* ms.*diffusion_substeps >= 2"):
        make_plan(load_job(_job(tmp_path, bad)))
    ok = bad.replace("dt = 0.05", "dt = 0.05\ndiffusion_substeps = 2")
    assert make_plan(load_job(_job(tmp_path, ok))).dt_limit == pytest.approx(0.0415, abs=1e-4)


def test_bad_tissue_keys_give_one_line_errors(tmp_path):
    from engine.config import load_job

    cases = [(BENCH.replace("dx = 0.5", "dx = -0.5"), "key 'tissue.dx' = -0.5"),
             (BENCH.replace("dx = 0.5", "dx = 0.3"), "size_mm"),
             (BENCH.replace("sigma_et = 0.24\n", ""), "sigma_il, sigma_it, sigma_el, sigma_et"),
             (BENCH.replace("end_time = 200.0", "end_time = 200.0\nbogus = 1"), "unknown key 'tissue.bogus'"),
             (BENCH.replace('hi_mm = [1.5, 1.5, 1.5]', 'hi_mm = [-1.0, 1.5, 1.5]'), "must be >= lo_mm"),
             (BENCH.replace("P9 = [10.0, 3.5, 1.5]", "P9 = [30.0, 3.5, 1.5]"), "tissue.outputs.points.P9")]
    from engine.tissue.setup import make_plan

    for text, msg in cases:
        with pytest.raises(JobError) as e:
            make_plan(load_job(_job(tmp_path, text)))
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)


# ------------------------------------------------------------------------------- cells in tissue
@pytest.fixture(scope="module")
def tp06():
    from kernels.ode.cellml import import_cellml

    m = import_cellml(TP06)
    return m, np.array([q.default for q in m.parameters])


def test_cpu_and_numpy_tissue_steps_agree(tp06):
    """TP06 slab, 300 steps through stimulus and upstroke: C and NumPy kernels agree to 1e-8 mV
    (different libm/NumPy exp and operation order: round-off amplified through the upstroke)."""
    m, p = tp06
    shape = (9, 4, 3)
    g = _geom(shape, 0.25, 0.0953, 0.0126)
    st = [Stimulus(box_region(shape, 0.25, [0, 0, 0], [0.5, 0.5, 0.5]), 0.0, 2.0, -35.714)]
    r = [simulate(g, m, p, tissue_kernels(m, b), st, 0.02, 6.0, points={"end": (8, 3, 2)}, trace_every=0.02)
         for b in ("cpu", "numpy")]
    assert np.max(np.abs(r[0].traces - r[1].traces)) < 1e-8
    a0, a1 = r[0].maps.activation, r[1].maps.activation
    assert np.array_equal(np.isnan(a0), np.isnan(a1)) and np.nanmax(np.abs(a0 - a1)) < 1e-9


def _cable_cv(m, p, dx, dt=0.01, L=12.0):
    """Plane wave along x in a 1-node-thick cable (no-flux sides): CV from the activation times
    between 4 and 10 mm (away from the stimulus and the far end)."""
    from engine.tissue.analysis import plane_wave_cv

    shape = box_shape([L, 0.0, 0.0], dx)
    g = _geom(shape, dx, diffusivity(0.133418, 140, 0.01), diffusivity(0.017606, 140, 0.01))
    st = [Stimulus(box_region(shape, dx, [0, 0, 0], [1.0, 0, 0]), 0.0, 2.0, -35.714)]
    r = simulate(g, m, p, tissue_kernels(m, "cpu"), st, dt, 40.0, stop_after_activation=0.0)
    a = r.maps.activation[:, 0, 0]
    return plane_wave_cv(a, dx, int(round(4 / dx)), int(round(10 / dx)) + 1)


def test_plane_wave_cv_converges_with_dx(tp06):
    """CV of a plane wave at dx = 0.4, 0.2, 0.1, 0.05 mm (dt 0.01 ms) increases monotonically
    towards a limit: successive differences shrink by a factor > 2.5 from the second on (second
    order in dx gives 4 asymptotically; the sodium upstroke is under-resolved at 0.4 mm, measured
    ratios 2.2 and 3.0), and the Richardson estimate of the finest grid's error, d3 / (r - 1), is
    below 2 % (measured 0.7 %). The extrapolated CV (measured 0.62 mm/ms) must lie in 0.55-0.70
    mm/ms: the benchmark codes' converged activation at (20, 0, 0) mm, ~32 ms, means ~0.6 mm/ms."""
    m, p = tp06
    cv = [_cable_cv(m, p, dx) for dx in (0.4, 0.2, 0.1, 0.05)]
    d = np.diff(cv)
    assert all(np.isfinite(cv)) and np.all(d > 0), cv
    r = d[1] / d[2]
    assert d[0] > d[1] > d[2] and r > 2.5, cv
    assert d[2] / (r - 1) / cv[-1] < 0.02, cv
    assert 0.55 < cv[-1] + d[2] / (r - 1) < 0.70, cv


# ------------------------------------------------------------------------------- the benchmark job
REF = json.loads((ROOT / "tests" / "data" / "tissue" / "niederer_reference.json").read_text())


def test_niederer_benchmark_job_at_dx_05_matches_the_published_codes(tmp_path):
    """jobs/niederer_benchmark.toml (dx 0.5 mm, dt 0.05 ms) through `twin run`: the activation time
    at every point P1-P9 lies within one standard deviation of the mean of the 11 codes of
    Niederer et al. 2011 at dx 0.5 mm (their spread at this coarse resolution is the reference's own
    uncertainty: SD 0.4-36 ms). Also: the result opens with xarray and `twin report` draws it."""
    import xarray as xr

    from tests.helpers import run_twin

    job = _job(tmp_path, BENCH)
    r = run_twin("run", job, "-o", tmp_path / "run", "-q", env={"OMP_NUM_THREADS": "1"}, check=True)
    assert r.returncode == 0
    ds = xr.open_dataset(tmp_path / "run" / "RUN.h5", engine="h5netcdf")
    act = dict(zip(ds["point"].values.tolist(), ds["point_activation_time"].values.tolist()))
    ref = REF["by_dx"]["0.5"]
    for name, (mean, sd) in ref.items():
        assert abs(act[name] - mean) <= sd, (name, act[name], mean, sd)
    assert ds["activation_time"].shape == (41, 15, 7) and not np.isnan(ds["activation_time"].values).any()
    assert ds["ecg"].shape[0] == 2 and np.isfinite(ds["ecg"].values).all()
    stats = json.loads(ds.attrs["stats"])
    assert stats["median_cv_mm_per_ms"] > 0 and stats["steps"] < 4000  # stopped 1 ms after the last activation
    ds.close()
    summ = run_twin("summary", tmp_path / "run", check=True).stdout
    assert "P8: activation" in summ and "node-updates/s" in summ
    rep = run_twin("report", tmp_path / "run", "-o", tmp_path / "plots", check=True)
    made = sorted(Path(p).name for p in rep.stdout.split())
    assert made == ["V_traces.png", "activation_time_map.png", "ecg_traces.png"], made


# ------------------------------------------------------------------------------- CUDA (compile only here)
def test_tissue_cuda_source_compiles(tp06, tmp_path):
    """The tissue kernels' CUDA translation unit (TP06 + tissue.c) compiles with NVRTC, the
    compiler CuPy's RawModule uses, and with nvcc to PTX for sm_90; all three entry points exist.
    Executing it needs a GPU: test_tissue_cuda_matches_cpu below skips without one."""
    import shutil
    import subprocess

    from kernels.tissue.build import tissue_source

    src = tissue_source(tp06[0])
    compiled = False
    nvcc = shutil.which("nvcc")
    if nvcc:
        (tmp_path / "t.cu").write_text(src)
        r = subprocess.run([nvcc, "-ptx", "-arch=sm_90", "--std=c++14", "-o", str(tmp_path / "t.ptx"),
                            str(tmp_path / "t.cu")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        ptx = (tmp_path / "t.ptx").read_text()
        for k in ("tissue_cell", "tissue_diffuse", "tissue_track"):
            assert f".entry {k}" in ptx
        compiled = True
    from tests.test_kernel_parity import NVRTC

    if NVRTC is not None:
        import ctypes

        prog = ctypes.c_void_p()
        assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"tissue.cu", 0, None, None) == 0
        opts = (ctypes.c_char_p * 2)(b"--std=c++14", b"-arch=compute_90")
        rc = NVRTC.nvrtcCompileProgram(prog, 2, opts)
        n = ctypes.c_size_t()
        NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        NVRTC.nvrtcGetProgramLog(prog, log)
        NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))
        assert rc == 0, log.value.decode()[-3000:]
        compiled = True
    if not compiled:
        pytest.skip("neither nvcc nor NVRTC available")


def _gpu() -> bool:
    try:
        import cupy as cp

        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy / driver: no GPU
        return False


@pytest.mark.skipif(not _gpu(), reason="no CUDA device")
@pytest.mark.parametrize("tables", [False, True])
def test_tissue_cuda_matches_cpu(tp06, tables):  # pragma: no cover - needs a GPU
    """Same slab as test_cpu_and_numpy_tissue_steps_agree on the GPU: traces within 1e-8 mV, with
    the exact cell step and with lookup tables (the GPU runs the scalar table step, the CPU the
    vectorised one: same table, exp/log differing by an ulp or two)."""
    import cupy as cp

    m, p = tp06
    shape = (9, 4, 3)
    g = _geom(shape, 0.25, 0.0953, 0.0126, (1.0, 0.3, 0.1))
    st = [Stimulus(box_region(shape, 0.25, [0, 0, 0], [0.5, 0.5, 0.5]), 0.0, 2.0, -35.714)]
    r = [simulate(g, m, p, tissue_kernels(m, b, tables), st, 0.02, 6.0, points={"end": (8, 3, 2)},
                  trace_every=0.02, xp=xp) for b, xp in (("cpu", np), ("cuda", cp))]
    assert np.max(np.abs(r[0].traces - r[1].traces)) < 1e-8


def test_uniformly_stimulated_tissue_matches_an_independent_single_cell_solve(tp06):
    """Stimulate every voxel of a 3 x 2 x 2 block: no gradients, so each voxel is a single TP06
    cell integrated by the tissue cell step (Rush-Larsen / forward Euler, dt 0.01 ms). The
    independent reference is the same cell integrated by the adaptive stiff Rodas4 kernel at rtol
    1e-8 (kernels/compile.py). The tracked activation time (0 mV up-crossing) agrees within
    0.02 ms = 2 steps (first-order error of the explicit step through the upstroke; measured
    0.017 ms), the APD (down-crossing of -70 mV minus activation, ~288 ms) within 0.2 % (measured
    0.05 ms = 0.02 %)."""
    from engine.pacing import Protocol, pacing_events
    from kernels.compile import ode_kernel
    from kernels.ode.integrate_numpy import SolverOptions

    m, p = tp06
    shape = (3, 2, 2)
    g = _geom(shape, 0.25, 0.0953, 0.0126)
    st = [Stimulus(np.ones(shape, bool), 0.0, 2.0, -35.714)]
    r = simulate(g, m, p, tissue_kernels(m, "cpu"), st, 0.01, 400.0, thr_act=0.0, thr_rep=-70.0)
    act, apd = r.maps.activation, r.maps.apd
    assert np.ptp(act) == 0 and np.ptp(apd) == 0  # all voxels identical
    P = p[:, None]
    ev = pacing_events(m, P, Protocol(n_beats=1, cycle_length=1000.0, amplitude=-35.714, duration=2.0, offset=0.0))
    t = np.arange(0.0, 400.0, 0.005)
    k = ode_kernel(m, "cpu")
    out, status = k.run(P, ev, t, SolverOptions(method="rodas4", rtol=1e-8, atol=1e-10, max_steps=10**7),
                        ["V"], np.zeros(1, np.int8))
    assert status[0] == 0
    V = out[0, 0]
    i = np.flatnonzero((V[:-1] < 0) & (V[1:] >= 0))[0]
    t_up = t[i] + (0 - V[i]) / (V[i + 1] - V[i]) * (t[i + 1] - t[i])
    j = np.flatnonzero((V[:-1] >= -70) & (V[1:] < -70))[0]
    t_dn = t[j] + (V[j] + 70) / (V[j] - V[j + 1]) * (t[j + 1] - t[j])
    assert abs(act.flat[0] - t_up) < 0.02, (act.flat[0], t_up)
    assert abs(apd.flat[0] - (t_dn - t_up)) < 0.002 * (t_dn - t_up), (apd.flat[0], t_dn - t_up)


def test_pseudo_ecg_matches_the_lead_field_integral_of_the_analytic_source():
    """The pseudo-ECG is phi_e = chi Cm / (4 pi sigma_e) * int div(D grad V) / |x - e| dV. For a
    Gaussian dipole layer V = 50 (x - c) exp(-|x - c|^2 / (2 s^2)) (s = 0.4 mm, 7.5 s from every
    face, so the no-flux boundary is irrelevant: tail ~ exp(-28)) the source div(D grad V) is known
    in closed form; its lead-field integral on the grid (trapezoid rule on a smooth, decaying
    integrand: spectrally accurate) is the reference. The solver's ECG after one step differs by
    the O(h^2) error of the discrete Laplacian: measured 0.1 % at h = 0.1 mm (0.02 % at 0.05 mm,
    ratio 4); tolerance 0.5 %. The two electrodes on opposite sides see opposite signs."""
    from engine.tissue.config import Electrode
    from engine.tissue.solver import TissueSolver
    from tests.tissue_helpers import PASSIVE

    import engine.tissue.simulate as simmod

    h, s2 = 0.1, 0.4**2
    shape = box_shape([6.0, 6.0, 6.0], h)
    Dd = (0.1, 0.02, 0.02)
    g = _geom(shape, h, Dd[0], Dd[1])
    x = np.stack(np.meshgrid(*[np.arange(n) * h for n in shape], indexing="ij"))
    X = [x[a] - 3.0 for a in range(3)]
    G = np.exp(-0.5 * sum(X[a] ** 2 for a in range(3)) / s2)
    v0 = 50 * X[0] * G
    src = 50 * (Dd[0] * G * (X[0] ** 3 / s2**2 - 3 * X[0] / s2)
                + sum(Dd[a] * X[0] * G * (X[a] ** 2 / s2**2 - 1 / s2) for a in (1, 2)))
    els = [Electrode(name="px", position_mm=[8.0, 3.0, 3.0]), Electrode(name="mx", position_mm=[-3.0, 3.0, 3.0]),
           Electrode(name="far", position_mm=[40.0, 3.0, 3.0])]
    chi, cm, sig = 140.0, 0.01, 0.2
    dt = 0.2 * max_stable_dt(g)
    orig = TissueSolver.__init__

    def init(self, *a, **k):  # start from v0 instead of the model's resting potential
        orig(self, *a, **k)
        full = np.zeros(self.shape)
        full[1:-1, 1:-1, 1:-1] = v0
        self.Y[self.vidx][:] = full.reshape(-1)
        self.Vprev[:] = full.reshape(-1)

    TissueSolver.__init__ = init
    try:
        r = simmod.simulate(g, PASSIVE, np.zeros(0), tissue_kernels(PASSIVE, "cpu"), [], dt, dt, electrodes=els,
                            trace_every=dt, chi=chi, cm=cm, sigma_bath=sig)
    finally:
        TissueSolver.__init__ = orig
    ecg = r.ecg[:, 1]  # after the first step: the source of v0 (the passive cell leaves V alone)
    const = chi * cm / (4 * np.pi * 1e-3 * sig)
    for e, el in enumerate(els):
        rr = np.sqrt(sum((x[a] - el.position_mm[a]) ** 2 for a in range(3)))
        ref = const * np.sum(src / rr) * h**3
        assert abs(ecg[e] - ref) < 5e-3 * abs(ref), (el.name, ecg[e], ref)
    assert ecg[0] > 0 > ecg[1]


def test_solver_stops_with_a_clear_error_when_the_potential_blows_up(tp06):
    """Bypassing the job's stability check (dt 5x the diffusion limit) the potential diverges; the
    run stops at the next sample with Diverged (a one-line user error), not a file full of NaN."""
    m, p = tp06
    shape = (12, 4, 3)
    g = _geom(shape, 0.1, 0.0953, 0.0126)
    st = [Stimulus(box_region(shape, 0.1, [0, 0, 0], [0.3, 0.3, 0.3]), 0.0, 2.0, -35.714)]
    with pytest.raises(Diverged, match=r"non-finite by t = .* ms \(dx = 0.1 mm, dt = 0.2 ms\): lower dt"):
        simulate(g, m, p, tissue_kernels(m, "cpu"), st, 0.2, 50.0, trace_every=1.0)
