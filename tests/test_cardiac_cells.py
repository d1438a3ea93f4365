"""Cardiac cell models imported from CellML / Myokit (.mmt) and paced with engine.pacing.

References (tests/data/cardiac/SOURCES.md):
* APD90 after 1000 beats at 1 Hz, Myokit CVODES (shared measurements): ORd-CiPA endo 261.67 ms,
  ORd 2011 endo 265.57, ToR-ORd-dynCl endo 272.46, TP06 epi 300.73.
* myokit_reference.json (tests/data/cardiac/make_myokit_reference.py): Myokit's state after 999
  beats and its beat-1000 biomarkers on our sampling grid. CI starts our integrator from that state
  and checks beat 1000 (1 beat instead of 1000); benchmarks/cardiac_cells.py runs the full 1000.
The importers need myokit (pip install myokit); without it these tests skip.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("myokit")

from engine.pacing import (DEFAULT_SOLVER, BeatRules, Protocol, beat_biomarkers, beat_grid,  # noqa: E402
                           ikr_block_factor, initial_state, pace, pacing_events, prepace)
from kernels.compile import ode_kernel  # noqa: E402
from kernels.ode.cellml import (QNET_CURRENTS, STIM_INPUT, import_cellml, import_cellml_mapped,  # noqa: E402
                                import_mmt, import_mmt_mapped)
from kernels.ode.integrate_numpy import EVENT_INPUT, SolverOptions  # noqa: E402
from kernels.ode.symbolic import gating  # noqa: E402

DATA = Path(__file__).parent / "data" / "cardiac"
REF = json.loads((DATA / "myokit_reference.json").read_text())["models"]
OPTS = DEFAULT_SOLVER  # Rodas4, rtol 3e-4 / atol 3e-6: the integrator chosen in benchmarks/cardiac_cells.py

# name -> (file, cell-type constant, value, shared Myokit APD90 after 1000 beats)
CASES = {
    "ord_cipa_endo": ("ohara-cipa-v1-2017.mmt", "cell.mode", 0, 261.67),
    "ord2011_endo": ("ohara-2011.mmt", "cell.mode", 0, 265.57),
    "torord_endo": ("tomek-2020.mmt", "cell.mode", 0, 272.46),
    "tp06_epi": ("tentusscher-2006.mmt", "cell.type", 1, 300.73),
}

# file -> (states, gating states found, currents present among the qNet six)
COVERAGE = {
    "ohara-cipa-v1-2017.mmt": (48, 40, 6),
    "ohara-2011.mmt": (41, 33, 6),
    "tomek-2020.mmt": (45, 34, 6),
    "tentusscher-2006.mmt": (19, 13, 5),
    "ohara_rudy_cipa_v1_2017.cellml": (48, 40, 6),
    "ohara_rudy_2011_endo.cellml": (41, 33, 6),
    "ToRORd_dynCl_endo.cellml": (45, 34, 6),
    "ten_tusscher_model_2006_epi.cellml": (19, 13, 5),
    "ten_tusscher_model_2006_endo.cellml": (19, 13, 5),  # no oxmeta annotations: found by name
}

_cache: dict = {}


def _load(name):
    if name not in _cache:
        f, key, val, _ = CASES[name]
        ci = import_mmt_mapped(DATA / f, constants={key: val})
        _cache[name] = (ci, ode_kernel(ci.model, "cpu"))
    return _cache[name]


def _params(model, m=1, **over):
    p = np.repeat(np.array([[q.default] for q in model.parameters]), m, axis=1)
    for k, v in over.items():
        p[model.parameter_names.index(k)] = v
    return p


def _myokit_state(ci, name):
    ref = REF[name]["state_after_999_beats"]
    inv = {v: k for k, v in ci.names.items()}
    return np.array([[ref[inv[s]]] for s in ci.model.state_names])


def _measure(t, out, rec):
    d = dict(zip(rec, out))
    return beat_biomarkers(t - t[0], d["V"], d.get("Cai"), {c: d[c] for c in QNET_CURRENTS if c in d})


# ------------------------------------------------------------------------------------ importer
@pytest.mark.parametrize("fname", sorted(COVERAGE))
def test_import_coverage(fname):
    import myokit
    import myokit.formats

    n_states, n_gates, n_cur = COVERAGE[fname]
    if fname.endswith(".mmt"):
        ci = import_mmt_mapped(DATA / fname)
        mk = myokit.load_model(str(DATA / fname))
    else:
        ci = import_cellml_mapped(DATA / fname)
        mk = myokit.formats.importer("cellml").model(str(DATA / fname))
    m = ci.model
    # states in Myokit's order, one each, with Myokit's initial values
    assert [ci.names[v.qname()] for v in mk.states()] == m.state_names
    assert len(m.states) == n_states
    np.testing.assert_allclose([s.init for s in m.states], [v.initial_value(True) for v in mk.states()], rtol=1e-15)
    assert len(gating(m)) == n_gates
    assert m.input_names == [STIM_INPUT]
    assert {"V", "Cai", "i_stim"} <= set(m.output_names)
    assert sum(c in m.output_names for c in QNET_CURRENTS) == n_cur
    st = ci.stimulus
    assert st.amplitude < 0 and 0 < st.duration <= 1 and st.period == 1000
    assert {"stim_amplitude", "stim_duration", "stim_period", "stim_offset"} <= set(m.parameter_names)
    assert m.unit_of("V") == "mV" and m.time_unit == "ms"
    # the stimulus is the input: every expression that read the old stimulus reads i_stim_amp
    stim_name = ci.names[ci.stimulus_variable]
    assert dict(m.expressions)[stim_name] == STIM_INPUT


def test_import_functions_return_models_and_overrides():
    m = import_mmt(DATA / "ohara-2011.mmt", constants={"cell.mode": 2})
    assert m.defaults()["cell_mode"] == 2
    assert import_cellml(DATA / "ten_tusscher_model_2006_epi.cellml").name == "ten_tusscher_model_2006_epi"
    with pytest.raises(ValueError, match="not literal constants"):
        import_mmt(DATA / "ohara-2011.mmt", constants={"cell.nope": 1})


def _mmt(tmp_path, body: str):
    text = textwrap.dedent("""
        [[model]]
        c.x = 1
        c.V = -80

        [engine]
        time = 0 [ms] bind time
        pace = 0 bind pace

        [stim]
        i_stim = engine.pace * amp
        amp = -10

        [c]
        dot(V) = -(i + stim.i_stim)
        dot(x) = (xinf - x) / 2
        """) + textwrap.dedent(body)
    p = tmp_path / "tiny.mmt"
    p.write_text(text)
    return p


def test_piecewise_and_logic_translate(tmp_path):
    from kernels.ode.codegen_numpy import generate

    f = _mmt(tmp_path, """
        k = 0.5
        xinf = piecewise(V < -50 and V > -90, 0.1, V >= 0 or k == 1, 0.9, 0.5)
        i = if(not (V < -60), 1, 0) * k * (V + 80) + log(2, 4) + log10(100) + tan(0) + abs(-0)
        """)
    m = import_mmt(f)
    assert m.state_names == ["c_x", "c_V"] and m.defaults()["stim_amplitude"] == -10
    gen = generate(m)
    p = _params(m)
    # V -> (xinf, i); log(2, 4) = 0.5 and log10(100) = 2
    for V, xinf, i in [(-80.0, 0.1, 2.5), (10.0, 0.9, 47.5), (-95.0, 0.5, 2.5), (-55.0, 0.1, 15.0)]:
        dy = gen.rhs(np.zeros(1), np.array([[1.0], [V]]), p, np.zeros((1, 1)))
        np.testing.assert_allclose(dy[0, 0], (xinf - 1.0) / 2, rtol=1e-12, err_msg=f"V={V}")
        np.testing.assert_allclose(dy[1, 0], -i, rtol=1e-12, err_msg=f"V={V}")


@pytest.mark.parametrize("body, feature", [
    ("k = 1\nxinf = floor(V)\ni = 0", "floor"),
    ("k = 1\nxinf = atan(V)\ni = 0", "atan"),
    ("k = 1\nxinf = V % 3\ni = 0", "Remainder"),
])
def test_unsupported_functions_are_named(tmp_path, body, feature):
    with pytest.raises(ValueError, match=f"unsupported CellML/Myokit feature.*{feature}"):
        import_mmt(_mmt(tmp_path, body))


def test_cellml_and_mmt_give_the_same_ord_cipa():
    """Two translations of ORd-CiPA v1 (Chaste's CellML, Myokit's mmt) through both import paths:
    same initial state, same stimulus -> the same action potential."""
    res = []
    for ci in (import_cellml_mapped(DATA / "ohara_rudy_cipa_v1_2017.cellml"),
               import_mmt_mapped(DATA / "ohara-cipa-v1-2017.mmt", constants={"cell.mode": 0})):
        k = ode_kernel(ci.model, "cpu")
        p = _params(ci.model)
        proto = Protocol(1, cycle_length=1000.0, amplitude=-80.0, duration=0.5, offset=50.0)
        t, out, st = pace(k, p, proto, OPTS, ["V", "Cai"])
        assert st[0] == 0
        res.append(_measure(t, out, ["V", "Cai"]))
    for key in ("APD90", "Vpeak", "Vrest", "CaT_amplitude"):
        np.testing.assert_allclose(res[0][key], res[1][key], rtol=1e-6, err_msg=key)


# ------------------------------------------------------------------------- accuracy vs Myokit
@pytest.mark.parametrize("name", list(CASES))
def test_steady_state_beat_matches_myokit(name):
    """From Myokit's state after 999 beats, our beat 1000: APD90 within 1 ms of Myokit's 1000-beat
    figure, Vpeak and Vrest within 1 mV of Myokit's run (in fact ~0.05 ms and ~0.02 mV)."""
    ci, k = _load(name)
    m = ci.model
    p = _params(m)
    rec = ["V", "Cai"] + [c for c in QNET_CURRENTS if c in m.output_names]
    t, out, st = pace(k, p, Protocol(1, cycle_length=1000.0), OPTS, rec, y0=_myokit_state(ci, name))
    assert st[0] == 0
    bm = _measure(t, out, rec)
    myo = REF[name]["beat_1000"]
    assert abs(bm["APD90"][0] - CASES[name][3]) < 1.0
    assert abs(bm["APD90"][0] - myo["APD90"]) < 0.2
    assert abs(bm["Vpeak"][0] - myo["Vpeak"]) < 1.0
    assert abs(bm["Vrest"][0] - myo["Vrest"]) < 1.0
    np.testing.assert_allclose(bm["CaT_amplitude"][0], myo["CaT_amplitude"], rtol=0.01)
    np.testing.assert_allclose(bm["qNet"][0], myo["qNet"], rtol=0.02, atol=0.5)
    assert bm["EAD"][0] == 0 and bm["repolarisation_failure"][0] == 0 and bm["no_ap"][0] == 0


def test_prepace_from_steady_state_stays_converged():
    ci, k = _load("ord_cipa_endo")
    p = _params(ci.model)
    y0 = _myokit_state(ci, "ord_cipa_endo")
    r = prepace(k, p, Protocol(10, cycle_length=1000.0), OPTS, y0=y0, tol=1e-3, chunk=5)
    assert r.beats == 5 and r.converged.all() and (r.status == 0).all()
    # beat 1 moves Myokit's state by the solvers' tolerance difference (largest: hERG Markov states
    # ~1e-4 known to atol 1e-6, 0.1 %); after that the change per beat is ~1e-5
    assert r.rel_change.shape == (1, 5) and r.rel_change[0, 0] < 1e-2 and np.all(r.rel_change[0, 1:] < 1e-4)
    np.testing.assert_allclose(r.y, y0, rtol=5e-3, atol=1e-9)
    # from the model's own initial state the state is still moving after 3 beats
    r = prepace(k, p, Protocol(3, cycle_length=1000.0), OPTS, tol=1e-6, chunk=3)
    assert r.beats == 3 and not r.converged.any()


def test_ikr_block_prolongs_apd90_monotonically():
    """ORd-CiPA, simple pore block of IKr: gKr scaled by 1/(1+([D]/IC50)^h) at 5 levels, one
    cell each in one kernel call, 5 beats from the control steady state."""
    ci, k = _load("ord_cipa_endo")
    m = ci.model
    conc = np.array([0.0, 0.3, 1.0, 3.0, 10.0])  # multiples of IC50
    scale = ikr_block_factor(conc, 1.0, 1.0)
    p = _params(m, 5)
    p[m.parameter_names.index("ikr_gKr")] *= scale
    y0 = np.repeat(_myokit_state(ci, "ord_cipa_endo"), 5, axis=1)
    rec = ["V", "Cai"] + list(QNET_CURRENTS)
    t, out, st = pace(k, p, Protocol(5, cycle_length=1000.0), OPTS, rec, y0=y0)
    assert (st == 0).all()
    bm = _measure(t, out, rec)
    apd = bm["APD90"]
    assert np.all(np.diff(apd) > 1.0), apd
    assert apd[-1] > 1.3 * apd[0]
    assert np.all(np.diff(bm["qNet"]) < 0), bm["qNet"]  # less outward IKr charge: lower qNet (CiPA)


@pytest.mark.parametrize("method, stop", [("rodas4", 4.0), ("rush_larsen", 12.0)])
def test_numpy_and_cpu_agree_on_a_short_run(method, stop):
    """TP06 epi from Myokit's steady state through the stimulus (at 1 ms) and the upstroke."""
    name = "tp06_epi"
    ci, kc = _load(name)
    m = ci.model
    kn = ode_kernel(m, "numpy")
    p = _params(m)
    y0 = _myokit_state(ci, name)
    ev = pacing_events(m, p, Protocol(1, cycle_length=1000.0, offset=1.0))
    times = np.linspace(0.0, stop, 9)
    rec = ["V", "Cai", "IKr", "ICaL"] + m.state_names
    opts = SolverOptions(method=method, rtol=1e-4, atol=1e-6, dt=0.01)
    oc, sc = kc.run(p, ev, times, opts, rec, np.zeros(1, np.int8), y0=y0)
    on, sn = kn.run(p, ev, times, opts, rec, np.zeros(1, np.int8), y0=y0)
    assert sc[0] == 0 and sn[0] == 0
    assert oc[0, 0].max() > 0  # the upstroke happened
    np.testing.assert_allclose(on, oc, rtol=1e-7, atol=1e-12)


# ----------------------------------------------------------------------------- pacing pieces
def test_pacing_events_layout():
    ci, k = _load("tp06_epi")
    m = ci.model
    p = _params(m, 2)
    ev = pacing_events(m, p, Protocol(3, cycle_length=500.0, amplitude=np.array([-50.0, -60.0])))
    np.testing.assert_allclose(ev.time[:, 0], [50, 50.5, 550, 550.5, 1050, 1050.5])
    np.testing.assert_allclose(ev.value[:, 1], [-60, 60] * 3)
    assert (ev.kind == EVENT_INPUT).all() and (ev.target == 0).all()
    np.testing.assert_allclose(initial_state(k, p)[:, 0], [s.init for s in m.states])
    with pytest.raises(ValueError, match="inside its cycle"):
        pacing_events(m, p, Protocol(1, cycle_length=100.0, offset=99.8, duration=0.5))
    g = beat_grid(50.0, 1000.0)
    assert g[0] == 50.0 and g[-1] == 1050.0 and np.isclose(np.diff(g)[:10], 0.01).all()


def _synthetic_ap(t, apd=300.0, notch=False, ead=False, fail=False):
    """Piecewise-linear AP: rest -85, upstroke 0->1 ms to +40, plateau decline to 0 mV, linear
    repolarisation to -85 by `apd`."""
    V = np.full_like(t, -85.0)
    up = (t >= 0) & (t < 1)
    V[up] = -85 + 125 * t[up]
    pl = (t >= 1) & (t < apd - 100)
    V[pl] = 40 - 40 * (t[pl] - 1) / (apd - 101)
    rp = (t >= apd - 100) & (t < apd)
    V[rp] = -85 * (t[rp] - (apd - 100)) / 100
    if notch:  # spike-notch-dome: dip to 10 mV at 5 ms, back to the plateau line by 30 ms
        d = (t > 1) & (t < 30)
        V[d] -= 25 * np.sin(np.pi * (t[d] - 1) / 29)
    if ead:  # re-depolarisation of 5 mV during phase 3
        e = (t > apd - 60) & (t < apd - 40)
        V[e] += 10 * np.sin(np.pi * (t[e] - (apd - 60)) / 20)
    if fail:
        V[t >= apd - 100] = -20.0
    return V


def test_beat_biomarkers_on_synthetic_traces():
    t = np.arange(0.0, 1000.0001, 0.01)
    V = np.vstack([_synthetic_ap(t), _synthetic_ap(t, notch=True), _synthetic_ap(t, ead=True),
                   _synthetic_ap(t, fail=True), np.full_like(t, -85.0) + 5 * (t < 2)])
    u = np.clip(t / 10, 0, 1)  # smoothstep rise over 10 ms (steepest at 5 ms), then exponential decay
    Cai = np.vstack([1e-4 + 4e-4 * u * u * (3 - 2 * u) * np.exp(-np.maximum(t - 10, 0) / 100)] * 5)
    cur = {"IKr": np.full_like(V, 0.5), "ICaL": np.full_like(V, -0.2)}
    b = beat_biomarkers(t, V, Cai, cur, BeatRules())
    # linear pieces: the interpolated crossings are exact; the (linear) upstroke lies in [0, 1]
    vr, vp = -85.0, 40.0
    assert 0 < b["t_up"][0] < 1
    for x in (30, 50, 90):
        lv = vp - x / 100 * (vp - vr)
        t_cross = 200 - 100 * lv / 85 if lv <= 0 else 1 + (40 - lv) / 40 * 199
        np.testing.assert_allclose(b[f"APD{x}"][0] + b["t_up"][0], t_cross, atol=1e-6, err_msg=x)
    np.testing.assert_allclose(b["dVdt_max"][0], 125.0)
    np.testing.assert_allclose(b["triangulation"][0], b["APD90"][0] - b["APD30"][0])
    np.testing.assert_array_equal(b["EAD"], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(b["repolarisation_failure"], [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(b["no_ap"], [0, 0, 0, 0, 1])
    assert np.isnan(b["APD90"][4])
    np.testing.assert_allclose(b["qNet"], 0.3 * 1000.0)
    np.testing.assert_allclose(b["CaT_amplitude"], 4e-4)
    # back to 10 % of the amplitude at 10 + 100 ln 10 ms; the steepest rise at 5 ms
    np.testing.assert_allclose(b["CaTD90"], 10 + 100 * np.log(10) - 5, atol=0.006)
    bad = V.copy()
    bad[0, 5] = np.nan
    assert np.isnan(beat_biomarkers(t, bad)["APD90"][0])
