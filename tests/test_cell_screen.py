"""Cardiac-cell screens: populations of models under drug block, through `twin run` (engine/cell_screen.py),
and the CiPA-style TdP risk classification (engine/cipa.py).

The cells are O'Hara-Rudy CiPA v1 (the Myokit file shipped with jobs/cipa_screen.toml), paced at
2000 ms with few beats so the suite stays fast: these tests check the machinery (conditions, block,
per-cell streams, ranks, classification arithmetic); steady-state accuracy against Myokit is
tests/test_cardiac_cells.py's job.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from engine.cell_screen import block_factor, read_drug_table
from engine.cipa import auc, classify, fit_ordinal
from engine.errors import JobError
from tests.helpers import MPIEXEC, mpi_cmd, run_twin

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "jobs" / "models" / "ohara-cipa-v1-2017.mmt"
DRUGS = ROOT / "jobs" / "data" / "cipa28.csv"
CHANNELS = {"hERG": "ikr_gKr", "ICaL": "ical_PCa_base", "INa_peak": "ina_gNa", "INaL": "inal_gNaL",
            "Ito": "ito_gto", "IKs": "iks_gKs", "IK1": "ik1_gK1"}


def screen_job(drugs=DRUGS, select=("dofetilide", "ondansetron", "verapamil", "ibutilide"), multiples=(1.0, 2.0, 3.0, 4.0),
               cells=2, chunk=17, prepace=20, beats=2, cl=2000.0, channels=CHANNELS, extra=""):
    sel = f"select = {list(select)}\n" if select else ""
    ch = "\n".join(f'{k} = "{v}"' for k, v in channels.items())
    return f"""[job]
name = "screen"
seed = 11
chunk_size = {chunk}
backend = "cpu"
[model]
name = "ohara_cipa_v1_2017"
file = "{MODEL}"
[model.parameters]
cell_mode = 0
[solver]
method = "rodas4"
rtol = 3e-4
atol = 3e-6
max_steps = 100000000
[pacing]
cycle_length = {cl}
prepace_beats = {prepace}
beats = {beats}
[cohort]
size = {cells}
[cohort.variability]   # a population of models: log-normal scale factors, CV ~20 %
parameters = ["ikr_gKr", "ical_PCa_base", "iks_gKs"]
omega = [[0.04, 0.0, 0.0], [0.0, 0.04, 0.0], [0.0, 0.0, 0.04]]
[[arms]]
name = "paced"
[screen]
drugs = "{drugs}"
{sel}multiples = {list(multiples)}
metric_multiples = {[m for m in multiples if m <= 4.0] or [multiples[0]]}
[screen.channels]
{ch}
[outputs]
times = {{ start = 0.0, stop = {cl}, step = 10.0 }}
variables = ["V"]
{extra}"""


def read(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.ndim >= 1 and name not in ("patient", "time"):
                out[name] = obj[()]
        f.visititems(visit)
    return out


@pytest.fixture(scope="module")
def screen_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("screen")
    (d / "job.toml").write_text(screen_job())
    r = run_twin("run", d / "job.toml", "-o", d / "run", "-q", timeout=600)
    assert r.returncode == 0, r.stderr
    return d


# ------------------------------------------------------------------------------------ block, table
def test_block_factor():
    assert block_factor(100.0, 100.0, 1.0) == pytest.approx(0.5)  # half block at the IC50
    assert block_factor(0.0, 100.0, 2.0) == 1.0
    assert block_factor(300.0, 100.0, 2.0) == pytest.approx(1 / (1 + 9))  # Hill coefficient is the exponent
    f = block_factor(np.array([1.0, 10.0, 100.0, 1000.0]), 50.0, 0.8)
    assert np.all(np.diff(f) < 0)


def test_drug_table_rows(tmp_path):
    drugs = read_drug_table(DRUGS, list(CHANNELS), "t")
    assert len(drugs) == 28 and sum(d.set == "training" for d in drugs) == 12
    dof = next(d for d in drugs if d.name == "dofetilide")
    assert dof.risk == "high" and dof.eftpc_nM == 2 and dof.ic50_nM["hERG"] == pytest.approx(1.461870897)
    assert "IKs" not in dof.ic50_nM  # an empty cell: no block of that channel
    head = DRUGS.read_text().splitlines()[0]
    bad = {
        "x,training,high,abc" + ",1" * 14: "EFTPC_nM = 'abc' is not a number",
        "x,training,high,10,5," + ",1" * 12 + ",": "channel hERG needs both IC50 > 0 and Hill > 0",
        "x,training,severe,10" + ",1" * 14: "TdP_risk = 'severe'",
        "x,training,high,-3" + ",1" * 14: "must be finite and >= 0",
    }
    for row, want in bad.items():
        p = tmp_path / "d.csv"
        p.write_text(head + "\n" + row + "\n")
        with pytest.raises(JobError, match=want.replace("(", r"\(").replace(")", r"\)")):
            read_drug_table(p, list(CHANNELS), "key 'screen.drugs'")
    p = tmp_path / "d.csv"
    p.write_text("drug,EFTPC_nM\nx,1\n")
    with pytest.raises(JobError, match="lacks columns"):
        read_drug_table(p, list(CHANNELS), "t")


def test_job_errors_name_the_key(tmp_path):
    cases = [
        (screen_job(channels={**CHANNELS, "hERG": "ikr_gKR"}), "screen.channels.hERG' = 'ikr_gKR'"),
        (screen_job(select=("dofetilide", "aspirin")), "['aspirin'] are not in"),
        (screen_job(multiples=(2.0, 1.0)), "multiples must be strictly increasing"),
        (screen_job().replace("cycle_length = 2000.0", "cycle_length = 1000.0"), "outputs.times"),
    ]
    for text, want in cases:
        p = tmp_path / "bad.toml"
        p.write_text(text)
        r = run_twin("run", p, "-o", tmp_path / "r", "-q")
        assert r.returncode == 2 and want in r.stderr and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------------------------ the run
def test_conditions_cells_and_block(screen_run):
    a = read(screen_run / "run" / "RUN.h5")
    n_cond = 1 + 4 * 4  # control + 4 drugs x 4 multiples
    assert a["status"].shape == (2 * n_cond,) and (a["status"] == 0).all()
    np.testing.assert_array_equal(a["screen/cell"], np.repeat([0, 1], n_cond))
    # a cell is the same cell under every condition (its own random stream), and cells differ
    for p in ("ikr_gKr", "ical_PCa_base", "iks_gKs"):
        v = a[f"cohort/{p}"].reshape(2, n_cond)
        assert (v == v[:, :1]).all() and v[0, 0] != v[1, 0]
    ctrl = a["screen/drug"] == -1
    for k, v in a.items():
        if k.startswith("screen/block_"):
            assert (v[ctrl] == 1.0).all() and (v[~ctrl] <= 1.0).all()
    # the stored block is the formula at the stored concentration (dofetilide's hERG)
    drugs = {d.name: d for d in read_drug_table(DRUGS, list(CHANNELS), "t")}
    with h5py.File(screen_run / "run" / "RUN.h5", "r") as f:
        names = str(f["screen/drug"].attrs["flag_meanings"]).split()[1:]
    sel = a["screen/drug"] == names.index("dofetilide")
    want = block_factor(a["screen/concentration"][sel], drugs["dofetilide"].ic50_nM["hERG"], drugs["dofetilide"].hill["hERG"])
    np.testing.assert_allclose(a["screen/block_ikr_gKr"][sel], want, rtol=1e-15)
    np.testing.assert_allclose(a["screen/concentration"][sel], a["screen/multiple"][sel] * 2.0, rtol=1e-15)
    # physiology: dofetilide (hERG blocker) prolongs APD90 and lowers qNet against the same cell's control
    apd = a["biomarkers/APD90"]
    q = a["biomarkers/qNet"]
    for c in (0, 1):
        me = a["screen/cell"] == c
        c0 = me & ctrl
        # ORd-CiPA endo at 0.5 Hz; after only 20 beats from the initial state qNet (~0.02-0.03 uC/uF)
        # is below its steady value (~0.06-0.09): wide bounds, a sanity check of units and sign
        assert 150 < apd[c0][0] < 450 and 0.005 < q[c0][0] < 0.15
        assert (apd[me & sel] > apd[c0][0] + 20).all() and (q[me & sel] < q[c0][0]).all()


def test_screen_item_equals_direct_pacing(screen_run):
    """An item of the screen is exactly engine.pacing run by hand on that cell with the block applied."""
    from engine.config import load_job
    from engine.models import job_model
    from engine.pacing import Protocol, beat_biomarkers, pace, prepace
    from kernels.compile import ode_kernel
    from kernels.ode.cellml import QNET_CURRENTS
    from kernels.ode.integrate_numpy import SolverOptions

    a = read(screen_run / "run" / "RUN.h5")
    loaded = load_job(screen_run / "job.toml")
    model = job_model(loaded)
    kern = ode_kernel(model, "cpu")
    opts = SolverOptions(method="rodas4", rtol=3e-4, atol=3e-6, max_steps=10**8)
    i = 1 * 17 + 5  # cell 1, condition 5 (second drug, first multiple)
    P = np.array([[p.default for p in model.parameters]]).T.copy()
    pn = model.parameter_names
    P[pn.index("cell_mode")] = 0
    for name in ("ikr_gKr", "ical_PCa_base", "iks_gKs"):
        P[pn.index(name)] = a[f"cohort/{name}"][i]
    pre = prepace(kern, P.copy(), Protocol(20, cycle_length=2000.0), opts)
    for par in set(CHANNELS.values()):
        P[pn.index(par)] *= a[f"screen/block_{par}"][i]
    rec = ["V", "Cai", *[c for c in QNET_CURRENTS if c in model.output_names]]
    t, out, st = pace(kern, P, Protocol(2, cycle_length=2000.0), opts, rec, y0=pre.y, coarse=0.5)
    d = dict(zip(rec, out))
    bm = beat_biomarkers(t - t[0], d["V"], d["Cai"], {c: d[c] for c in QNET_CURRENTS if c in d})
    assert bm["APD90"][0] == a["biomarkers/APD90"][i]
    assert bm["qNet"][0] * 1e-3 == a["biomarkers/qNet"][i]


@pytest.mark.mpi
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed")
def test_two_ranks_equal_one(screen_run, tmp_path):
    out = tmp_path / "run2"
    p = subprocess.run(mpi_cmd(2, "run", screen_run / "job.toml", "-o", out, "--quiet"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    a, b = read(screen_run / "run" / "RUN.h5"), read(out / "RUN.h5")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_ikr_block_prolongs_apd_monotonically(tmp_path):
    """Pure IKr block at increasing concentration: APD90 increases at every step (and qNet falls)."""
    table = tmp_path / "herg.csv"
    table.write_text("drug,set,TdP_risk,EFTPC_nM,hERG_IC50_nM,hERG_hill\nherg_only,,,100,100,1\n")
    text = screen_job(drugs=table, select=(), multiples=(0.1, 0.3, 1.0, 3.0, 10.0), cells=1, chunk=6,
                      channels={"hERG": "ikr_gKr"}, prepace=30, beats=3)
    (tmp_path / "job.toml").write_text(text)
    r = run_twin("run", tmp_path / "job.toml", "-o", tmp_path / "run", "-q", timeout=600)
    assert r.returncode == 0, r.stderr
    a = read(tmp_path / "run" / "RUN.h5")
    apd, q = a["biomarkers/APD90"], a["biomarkers/qNet"]  # control first, then increasing block
    assert np.all(np.diff(apd) > 0.5), apd  # > 0.5 ms per step: a real prolongation, not round-off
    assert np.all(np.diff(q) < 0), q


# ------------------------------------------------------------------------------------ classification
def test_ordinal_fit_recovers_thresholds():
    rng = np.random.default_rng(0)
    # metric ~ U(0, 0.1); true thresholds 0.03 (high below) and 0.06 (intermediate below), logistic noise
    x = rng.uniform(0, 0.1, 4000)
    b = 300.0
    u = rng.uniform(size=x.size)
    y = (u < 1 / (1 + np.exp(-b * (0.06 - x)))).astype(int) + (u < 1 / (1 + np.exp(-b * (0.03 - x)))).astype(int)
    slope, thr = fit_ordinal(x, y)
    # 4000 observations: the thresholds are known to ~1e-3 (a few % of the 0.03 spacing)
    assert thr[0] == pytest.approx(0.06, abs=2e-3) and thr[1] == pytest.approx(0.03, abs=2e-3)
    assert slope == pytest.approx(b, rel=0.15)
    assert classify(0.01, thr) == "high" and classify(0.045, thr) == "intermediate" and classify(0.09, thr) == "low"
    # perfectly separated training data (as 12 drugs on one cell often are): finite thresholds between the classes
    _, thr = fit_ordinal(np.array([0.01, 0.02, 0.05, 0.055, 0.08, 0.09]), np.array([2, 2, 1, 1, 0, 0]))
    assert 0.02 < thr[1] < 0.05 and 0.055 < thr[0] < 0.08


def test_auc_is_mann_whitney():
    rng = np.random.default_rng(1)
    p, n = rng.normal(1, 1, 13), np.round(rng.normal(0, 1, 17), 1)
    p[:3] = n[:3]  # ties count one half
    u = mannwhitneyu(p, n).statistic
    assert auc(p, n) == pytest.approx(u / (p.size * n.size), rel=1e-12)


def test_summary_and_report_classify(screen_run, tmp_path):
    from engine.cipa import evaluate

    r = evaluate(screen_run / "run" / "RUN.h5")
    th = r["thresholds"]
    assert th["high_below"] < th["intermediate_below"]
    tr = r["sets"]["training"]
    assert tr["n"] == 3 and r["sets"]["validation"]["n"] == 1
    # one training drug per class, ordered by the metric: the fit must classify all three correctly
    assert tr["accuracy"] == 1.0 and tr["auc_high_vs_rest"] == 1.0
    s = run_twin("summary", screen_run / "run" / "RUN.h5")
    assert s.returncode == 0 and "thresholds fitted on training drugs only" in s.stdout and "ibutilide" in s.stdout
    rep = run_twin("report", screen_run / "run" / "RUN.h5", "-o", tmp_path / "rep")
    assert rep.returncode == 0, rep.stderr
    for name in ("cipa_qnet_vs_concentration.png", "cipa_tdp_metric.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 10_000


def test_acceptance_keeps_cells_inside_ranges(tmp_path):
    """Population calibration by acceptance (Britton et al. 2013): a cell is accepted exactly when its
    control-beat biomarkers lie inside every range. A pacing job without [screen] runs controls only."""
    base = screen_job(cells=6, chunk=6, prepace=5, beats=1)
    base = base[: base.index("[screen]")] + base[base.index("[outputs]"):]  # no drugs: one control per cell
    (tmp_path / "a.toml").write_text(base)
    r = run_twin("run", tmp_path / "a.toml", "-o", tmp_path / "a", "-q", timeout=600)
    assert r.returncode == 0, r.stderr
    a = read(tmp_path / "a" / "RUN.h5")
    apd, vrest = a["biomarkers/APD90"], a["biomarkers/Vrest"]
    assert a["status"].shape == (6,) and (a["biomarkers/accepted"] == 1).all()
    lo, hi = float(np.sort(apd)[1]) - 1e-6, float(np.sort(apd)[4]) + 1e-6  # drops the shortest and longest APD
    text = base.replace("beats = 1\n", f"beats = 1\naccept = {{ APD90 = [{lo!r}, {hi!r}], Vrest = [-100.0, -50.0] }}\n")
    (tmp_path / "b.toml").write_text(text)
    r = run_twin("run", tmp_path / "b.toml", "-o", tmp_path / "b", "-q", timeout=600)
    assert r.returncode == 0, r.stderr
    b = read(tmp_path / "b" / "RUN.h5")
    np.testing.assert_array_equal(b["biomarkers/APD90"], apd)  # acceptance only labels cells
    want = (apd >= lo) & (apd <= hi) & (vrest >= -100) & (vrest <= -50)
    assert want.sum() == 4
    np.testing.assert_array_equal(b["biomarkers/accepted"], want.astype(float))
    (tmp_path / "d.toml").write_text(text.replace("chunk_size = 6", "chunk_size = 4").replace("size = 6", "size = 6\n"))
    r = run_twin("run", tmp_path / "d.toml", "-o", tmp_path / "d", "-q")
    assert r.returncode == 0, r.stderr  # one condition per cell: any chunk size holds whole cells
    split = screen_job(chunk=5).replace("beats = 2\n", "beats = 2\naccept = { APD90 = [100.0, 500.0] }\n")
    (tmp_path / "e.toml").write_text(split)  # 17 conditions per cell, chunks of 5: a cell's control elsewhere
    r = run_twin("run", tmp_path / "e.toml", "-o", tmp_path / "e", "-q")
    assert r.returncode == 2 and "multiple of the 17 conditions" in r.stderr, r.stderr
    (tmp_path / "c.toml").write_text(text.replace("Vrest = [", "Vresting = ["))
    r = run_twin("run", tmp_path / "c.toml", "-o", tmp_path / "c", "-q")
    assert r.returncode == 2 and "pacing.accept" in r.stderr and "Vresting" in r.stderr, r.stderr
