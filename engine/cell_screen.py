"""Cardiac-cell jobs: populations of models, paced, under drug conditions (a CiPA-style screen).

A job with a `[pacing]` section runs cardiac cell models (CellML / Myokit files, imported by
kernels/ode/cellml.py) instead of dosed patients:

* the cohort is a population of cells: `[cohort.variability]` scales conductances log-normally per
  cell (Britton et al. 2013 style), keyed by the cell index like any virtual patient;
* every cell is paced to a control steady state (`prepace_beats`, optional `prepace_tol`), then,
  from that state, `beats` beats under each condition of `[screen]` (each drug at each multiple of
  its free therapeutic concentration, plus the control); the last beat is measured
  (engine.pacing.beat_biomarkers: APD30/50/90, triangulation, resting and peak Vm, max dV/dt,
  calcium transient, EAD, repolarisation failure, qNet);
* drug block is simple pore block: each channel's conductance parameter is multiplied by
  1 / (1 + (C / IC50)^h) with the drug's IC50 and Hill coefficient for that channel.

Items (the rows of the result) are cell-major: item i is cell i // n_conditions under condition
i % n_conditions, so a chunk holds whole cells and pre-paces each of them once. Results do not
depend on chunking or ranks: a cell's parameters come from its own random stream, and each item
is integrated on its own.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.compile import ode_kernel
from kernels.ode.cellml import QNET_CURRENTS

from .errors import JobError
from .layout import Layout, VarSpec, status_attrs
from .models import job_model
from .pacing import BeatRules, Protocol, beat_biomarkers, pace, prepace

RISK_LEVELS = ("low", "intermediate", "high")  # CiPA TdP risk categories, in increasing risk

# biomarker name -> (unit, description); computed on the last beat of every item
BIOMARKERS = {
    "APD30": ("ms", "action potential duration at 30% repolarisation"),
    "APD50": ("ms", "action potential duration at 50% repolarisation"),
    "APD90": ("ms", "action potential duration at 90% repolarisation"),
    "triangulation": ("ms", "APD90 - APD30"),
    "Vrest": ("mV", "resting potential before the stimulus"),
    "Vpeak": ("mV", "peak membrane potential"),
    "dVdt_max": ("mV/ms", "maximum upstroke velocity"),
    "CaT_amplitude": ("mM", "calcium transient amplitude (peak - diastolic Cai)"),
    "CaT_duration": ("ms", "calcium transient duration at 90% decay"),
    "qNet": ("uC/uF", "net charge of INaL+ICaL+IKr+IKs+IK1+Ito over the beat (A/F x ms / 1000, as CiPA)"),
    "EAD": ("1", "1 if an early afterdepolarisation was detected"),
    "repolarisation_failure": ("1", "1 if Vm did not repolarise before the next stimulus"),
    "prepace_converged": ("1", "1 if the cell's control state met prepace_tol (1 without a tolerance)"),
    "accepted": ("1", "1 if the cell's control beat is inside every pacing.accept range (1 without ranges)"),
}
_BEAT_KEYS = {"APD30": "APD30", "APD50": "APD50", "APD90": "APD90", "triangulation": "triangulation",
              "Vrest": "Vrest", "Vpeak": "Vpeak", "dVdt_max": "dVdt_max", "CaT_amplitude": "CaT_amplitude",
              "CaT_duration": "CaTD90", "qNet": "qNet", "EAD": "EAD", "repolarisation_failure": "repolarisation_failure"}


@dataclass
class Drug:
    name: str
    set: str  # training / validation / other
    risk: str  # low / intermediate / high / "" (unknown)
    eftpc_nM: float
    ic50_nM: dict[str, float]  # channel -> IC50 (channels without block absent)
    hill: dict[str, float]


@dataclass
class Condition:
    drug: int  # index into Screen.drugs, -1 for control
    multiple: float  # of EFTPC (0 for control)
    conc_nM: float


class Screen:
    """The drug table and the conditions of a job (the control first, then drug-major)."""

    def __init__(self, loaded, model):
        job = loaded.job
        sec = job.screen
        self.drugs: list[Drug] = []
        self.channels: dict[str, str] = {}
        if sec is not None:
            for ch, par in sec.channels.items():
                if par not in model.parameter_names:
                    raise JobError(f"{loaded.path}: key 'screen.channels.{ch}' = {par!r}: not a parameter of "
                                   f"{model.name}")
            self.channels = dict(sec.channels)
            self.drugs = read_drug_table(loaded.resolve(sec.drugs), list(sec.channels), f"key 'screen.drugs' = {sec.drugs!r}")
            if sec.select is not None:
                have = {d.name for d in self.drugs}
                missing = [d for d in sec.select if d not in have]
                if missing:
                    raise JobError(f"{loaded.path}: key 'screen.select': drugs {missing} are not in {sec.drugs}")
                self.drugs = [d for d in self.drugs if d.name in sec.select]
        self.conditions: list[Condition] = []
        if sec is None or sec.control:
            self.conditions.append(Condition(-1, 0.0, 0.0))
        for i, d in enumerate(self.drugs):
            for mult in (sec.multiples if sec else []):
                self.conditions.append(Condition(i, float(mult), float(mult) * d.eftpc_nM))

    def block_factors(self, cond: Condition) -> dict[str, float]:
        """Model parameter -> fraction of conductance left under the condition."""
        out = {}
        if cond.drug < 0:
            return out
        d = self.drugs[cond.drug]
        for ch, par in self.channels.items():
            if ch in d.ic50_nM:
                out[par] = block_factor(cond.conc_nM, d.ic50_nM[ch], d.hill[ch])
        return out


def block_factor(conc, ic50, hill):
    """Fraction of a channel's conductance left under simple pore block: 1 / (1 + (C/IC50)^h)."""
    return 1.0 / (1.0 + (np.asarray(conc, float) / ic50) ** hill)


def read_drug_table(path: Path, channels: list[str], where: str) -> list[Drug]:
    """Drug table CSV: one row per drug; an empty IC50 means no block of that channel."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"{where}: cannot read {path}: {e}") from None
    need = {"drug", "EFTPC_nM"} | {f"{c}_IC50_nM" for c in channels} | {f"{c}_hill" for c in channels}
    if not rows or need - set(rows[0]):
        raise JobError(f"{where}: {path.name} lacks columns {sorted(need - set(rows[0] if rows else []))}")
    out = []
    for k, r in enumerate(rows, start=2):
        def num(col, allow_empty=False):
            v = (r.get(col) or "").strip()
            if v == "" and allow_empty:
                return None
            try:
                x = float(v)
            except ValueError:
                raise JobError(f"{where}: {path.name} line {k} ({r.get('drug')}): column {col} = {v!r} is not a "
                               "number") from None
            if not math.isfinite(x) or x < 0:
                raise JobError(f"{where}: {path.name} line {k} ({r.get('drug')}): column {col} = {v!r} must be "
                               "finite and >= 0")
            return x
        ic50, hill = {}, {}
        for c in channels:
            a, h = num(f"{c}_IC50_nM", True), num(f"{c}_hill", True)
            if a is None and h is None:
                continue
            if a is None or h is None or a <= 0 or h <= 0:
                raise JobError(f"{where}: {path.name} line {k} ({r['drug']}): channel {c} needs both IC50 > 0 "
                               "and Hill > 0, or neither")
            ic50[c], hill[c] = a, h
        risk = (r.get("TdP_risk") or "").strip()
        if risk and risk not in RISK_LEVELS:
            raise JobError(f"{where}: {path.name} line {k}: TdP_risk = {risk!r}; allowed: {', '.join(RISK_LEVELS)}")
        out.append(Drug(r["drug"].strip(), (r.get("set") or "").strip(), risk, num("EFTPC_nM"), ic50, hill))
    names = [d.name for d in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise JobError(f"{where}: {path.name} repeats drugs {dup}")
    return out


# ------------------------------------------------------------------------------------ layout
def n_items(loaded, cohort) -> int:
    return cohort.n * len(screen_of(loaded).conditions)


def screen_of(loaded) -> Screen:
    s = getattr(loaded, "_screen", None)
    if s is None:
        s = loaded._screen = Screen(loaded, job_model(loaded))
    return s


def build_layout(loaded, cohort) -> Layout:
    job = loaded.job
    model = job_model(loaded)
    scr = screen_of(loaded)
    nc = len(scr.conditions)
    if job.pacing.accept and job.job.chunk_size % nc:
        raise JobError(f"{loaded.path}: key 'job.chunk_size' = {job.job.chunk_size}: with pacing.accept a chunk must hold "
                       f"whole cells, i.e. a multiple of the {nc} conditions per cell")
    bad = sorted(set(job.pacing.accept) - set(_BEAT_KEYS))
    if bad:
        raise JobError(f"{loaded.path}: key 'pacing.accept': {bad} are not beat biomarkers; allowed: "
                       f"{', '.join(_BEAT_KEYS)}")
    for n in job.outputs.variables:
        if n not in model.observable():
            raise JobError(f"{loaded.path}: key 'outputs.variables': {n!r} is not an output of {model.name}")
    times = job.outputs.time_values()
    if times[-1] > job.pacing.cycle_length:
        raise JobError(f"{loaded.path}: key 'outputs.times': a pacing job samples its last beat, so times run "
                       f"from 0 (the stimulus) to cycle_length = {job.pacing.cycle_length}; got up to {times[-1]}")
    v = [VarSpec(n, ("patient", "time"), "f8", {"units": model.unit_of(n), "long_name": f"{n} over the last beat"})
         for n in job.outputs.variables]
    v.append(VarSpec("status", ("patient",), "i1", status_attrs()))
    v.append(VarSpec("arm", ("patient",), "i2", {"flag_values": np.array([0], "i2"),
                                                  "flag_meanings": job.arms[0].name, "long_name": "arm"}))
    names = [d.name for d in scr.drugs]
    v.append(VarSpec("screen/cell", ("patient",), "i8", {"long_name": "cell (virtual myocyte) index"}))
    sec = job.screen
    v.append(VarSpec("screen/drug", ("patient",), "i2", {
        "flag_values": np.arange(-1, len(names), dtype="i2"), "flag_meanings": " ".join(["control", *names]),
        "long_name": "drug (-1: control)",
        # the drug table travels with the result, so the risk analysis needs no job file
        "drug_set": " ".join(d.set or "-" for d in scr.drugs),
        "tdp_risk": " ".join(d.risk or "unknown" for d in scr.drugs),
        "eftpc_nM": np.array([d.eftpc_nM for d in scr.drugs], float),
        "metric_multiples": np.array(sec.metric_multiples if sec else [], float)}))
    v.append(VarSpec("screen/multiple", ("patient",), "f8", {"units": "1", "long_name": "multiple of EFTPC"}))
    v.append(VarSpec("screen/concentration", ("patient",), "f8", {"units": "nM", "long_name": "free drug concentration"}))
    varied = sorted(set(cohort.iiv_names) | {e.parameter for e in cohort.effects})
    for p in varied:
        q = next(x for x in model.parameters if x.name == p)
        v.append(VarSpec(f"cohort/{p}", ("patient",), "f8", {"units": q.unit, "kind": "parameter",
                                                            "long_name": "cell's value (before drug block)"}))
    for par in sorted(set(scr.channels.values())):
        v.append(VarSpec(f"screen/block_{par}", ("patient",), "f8", {
            "units": "1", "long_name": f"fraction of {par} left under the drug"}))
    for k, (unit, desc) in BIOMARKERS.items():
        v.append(VarSpec(f"biomarkers/{k}", ("patient",), "f8", {"units": unit, "long_name": desc}))
    return Layout(n_items(loaded, cohort), times, model.time_unit, v, job.job.chunk_size)


# ------------------------------------------------------------------------------------ compute
def compute_chunk(plan, chunk_id: int, check=None) -> dict[str, np.ndarray]:  # noqa: ARG001
    job, layout, loaded = plan.job, plan.layout, plan.loaded
    model = job_model(loaded)
    scr = screen_of(loaded)
    nc = len(scr.conditions)
    start, stop = layout.chunk_bounds(chunk_id)
    items = np.arange(start, stop)
    cell, cond = items // nc, items % nc
    c_lo, c_hi = int(cell[0]), int(cell[-1]) + 1
    ch = plan.cohort.chunk(c_lo, c_hi)
    pn = model.parameter_names
    Pc = np.array([ch.parameters[n] for n in pn], float).reshape(len(pn), c_hi - c_lo)
    st_cell = ch.status.astype(np.int8).copy()
    defaults = np.array([p.default for p in model.parameters])[:, None]
    Pc = np.where(st_cell == 0, Pc, defaults)

    from .runner import solver_options

    opts = solver_options(job, model)
    kernel = ode_kernel(model, plan.backend.name, job.solver.precision)
    pc = job.pacing
    proto = dict(cycle_length=pc.cycle_length, amplitude=pc.amplitude, duration=pc.duration)

    # control steady state of each cell, once
    if pc.prepace_beats > 0:
        pre = prepace(kernel, Pc, Protocol(pc.prepace_beats, **proto), opts, tol=pc.prepace_tol)
        y_cell, st_pre, conv = pre.y, pre.status, pre.converged
    else:
        from .pacing import initial_state

        y_cell, st_pre, conv = initial_state(kernel, Pc), np.zeros(c_hi - c_lo, np.int8), np.ones(c_hi - c_lo, bool)
    st_cell = np.where(st_cell != 0, st_cell, st_pre).astype(np.int8)

    # every item: its cell's parameters x the condition's block, from the cell's control state
    k = cell - c_lo
    P = Pc[:, k].copy()
    blocks = {par: np.ones(len(items)) for par in set(scr.channels.values())}
    for j, c in enumerate(cond):
        for par, f in scr.block_factors(scr.conditions[c]).items():
            blocks[par][j] = f
    for par, f in blocks.items():
        P[pn.index(par)] *= f
    y0 = y_cell[:, k]
    if np.any(st_cell[k] != 0):  # failed cells run from the model's initial state (result masked)
        from .pacing import initial_state

        y0 = np.where(st_cell[k][None, :] == 0, y0, initial_state(kernel, P))
    rec = ["V"] + [n for n in ("Cai", *QNET_CURRENTS) if n in model.observable()]
    rec += [n for n in job.outputs.variables if n not in rec]
    t, out, st = pace(kernel, P, Protocol(pc.beats, **proto), opts, rec, y0=y0, fine=pc.fine_step,
                      coarse=pc.coarse_step, fine_span=pc.fine_span)
    status = np.where(st_cell[k] != 0, st_cell[k], st).astype(np.int8)
    d = dict(zip(rec, out))
    t_rel = t - t[0]
    bms = beat_biomarkers(t_rel, d["V"], d.get("Cai"), {c: d[c] for c in QNET_CURRENTS if c in d}, BeatRules())

    arrays: dict[str, np.ndarray] = {}
    ok = status == 0
    for name in job.outputs.variables:
        yv = np.array([np.interp(layout.time, t_rel, d[name][i]) for i in range(len(items))])
        yv[~ok] = np.nan
        arrays[name] = yv
    arrays["status"] = status
    arrays["arm"] = np.zeros(len(items), np.int16)
    arrays["screen/cell"] = cell.astype(np.int64)
    arrays["screen/drug"] = np.array([scr.conditions[c].drug for c in cond], np.int16)
    arrays["screen/multiple"] = np.array([scr.conditions[c].multiple for c in cond])
    arrays["screen/concentration"] = np.array([scr.conditions[c].conc_nM for c in cond])
    for par, f in blocks.items():
        arrays[f"screen/block_{par}"] = f
    for spec in layout.vars:
        if spec.path.startswith("cohort/"):
            arrays[spec.path] = Pc[pn.index(spec.path[7:]), k]
    for key, src in _BEAT_KEYS.items():
        val = np.asarray(bms.get(src, np.full(len(items), np.nan)), float) * (1e-3 if key == "qNet" else 1.0)
        val[~ok] = np.nan
        arrays[f"biomarkers/{key}"] = val
    arrays["biomarkers/prepace_converged"] = conv[k].astype(float)
    # acceptance: judged on each cell's control item, which is in this chunk (items are cell-major)
    accepted = np.ones(c_hi - c_lo, bool)
    if pc.accept:
        ctrl = np.array([scr.conditions[c].drug < 0 for c in cond])
        for name, (lo, hi) in pc.accept.items():
            v = arrays[f"biomarkers/{name}"][ctrl]
            inside = np.zeros(c_hi - c_lo, bool)
            inside[k[ctrl]] = (v >= lo) & (v <= hi)  # NaN (failed or no AP) is outside
            accepted &= inside
    arrays["biomarkers/accepted"] = accepted[k].astype(float)
    return arrays
