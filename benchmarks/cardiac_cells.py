"""Cardiac single cells at 1 Hz: steady-state biomarkers and cost, twin-engine vs Myokit (CVODES).

    .venv/bin/python benchmarks/cardiac_cells.py                      # 1000 beats, 4 models, writes JSON
    .venv/bin/python benchmarks/cardiac_cells.py --beats 50 --quick   # smoke run
    .venv/bin/python benchmarks/cardiac_cells.py --methods rodas4:1e-4 rodas4:1e-6 rush_larsen:0.005

Models (the Myokit .mmt files in tests/data/cardiac/, imported by kernels/ode/cellml.py), with the
cell type the shared Myokit measurements used: ORd-CiPA v1 endo, ORd 2011 endo, ToR-ORd-dynCl
endo, TP06 epi. Protocol: the files' own stimulus (0.5 ms at 2x threshold, offset 50 ms), cycle
1000 ms. For each solver configuration: pre-pace beats-1 beats (engine.pacing.prepace, chunks of
100, state convergence recorded), then the last beat sampled every 0.01 ms for 20 ms after the
stimulus and every 0.1 ms after, biomarkers from engine.pacing.beat_biomarkers. Myokit runs the
same protocol in the same process (Simulation, CVODES, default tolerances abs 1e-6 / rel 1e-4),
its last beat sampled on the same grid and measured by the same function. Reference APD90 values
are the shared Myokit measurements (copied figures below; origin in tests/data/cardiac/SOURCES.md).

CPU time is process time (all threads) per cell-beat; with --cells N the N cells are identical
copies (throughput, OpenMP over cells).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.pacing import Protocol, beat_biomarkers, beat_grid, pace, prepace  # noqa: E402
from kernels.compile import default_threads, ode_kernel  # noqa: E402
from kernels.ode.cellml import QNET_CURRENTS, import_mmt_mapped  # noqa: E402
from kernels.ode.integrate_numpy import SolverOptions  # noqa: E402

DATA = ROOT / "tests" / "data" / "cardiac"

# name -> (file, cell-type constant, value, Myokit CVODES APD90 after 1000 beats from the shared
# measurements file myokit_single_cell_1Hz_1000beats.json, run2_convergence beat 1000)
MODELS = {
    "ord_cipa_endo": ("ohara-cipa-v1-2017.mmt", "cell.mode", 0, 261.67),
    "ord2011_endo": ("ohara-2011.mmt", "cell.mode", 0, 265.57),
    "torord_endo": ("tomek-2020.mmt", "cell.mode", 0, 272.46),
    "tp06_epi": ("tentusscher-2006.mmt", "cell.type", 1, 300.73),
}
KEYS = ("APD30", "APD50", "APD90", "Vrest", "Vpeak", "dVdt_max", "CaT_amplitude", "CaTD90", "qNet", "EAD",
        "repolarisation_failure")


def load(name: str):
    f, key, val, ref = MODELS[name]
    ci = import_mmt_mapped(DATA / f, constants={key: val})
    return ci, ref


def solver(spec: str) -> SolverOptions:
    method, _, x = spec.partition(":")
    if method == "rodas4":
        rtol = float(x or 1e-4)
        return SolverOptions(method="rodas4", rtol=rtol, atol=rtol * 1e-2, max_steps=10**9)
    if method == "rush_larsen":
        return SolverOptions(method="rush_larsen", dt=float(x or 0.005), max_steps=10**10)
    if method == "dopri5":
        rtol = float(x or 1e-6)
        return SolverOptions(method="dopri5", rtol=rtol, atol=rtol * 1e-2, max_steps=10**10)
    raise ValueError(spec)


def record_names(model) -> list[str]:
    outs = model.output_names
    return ["V", "Cai"] + [c for c in QNET_CURRENTS if c in outs]


def biomarkers_from(t, samples, names):
    d = dict(zip(names, samples))
    cur = {k: d[k] for k in QNET_CURRENTS if k in d}
    return beat_biomarkers(t - t[0], d["V"], d["Cai"], cur)


def reference_state(ci, name: str) -> np.ndarray:
    """Myokit's state after 999 beats (tests/data/cardiac/myokit_reference.json), our state order."""
    ref = json.loads((DATA / "myokit_reference.json").read_text())["models"][name]["state_after_999_beats"]
    inv = {v: k for k, v in ci.names.items()}
    return np.array([[ref[inv[s]]] for s in ci.model.state_names])


def run_ours(name: str, spec: str, beats: int, cells: int, from_reference: bool = False) -> dict:
    ci, _ = load(name)
    model = ci.model
    t0 = time.perf_counter()
    k = ode_kernel(model, "cpu")
    compile_s = time.perf_counter() - t0
    p = np.repeat(np.array([[q.default] for q in model.parameters]), cells, axis=1)
    opts = solver(spec)
    w0, c0 = time.perf_counter(), time.process_time()
    y0 = np.repeat(reference_state(ci, name), cells, axis=1) if from_reference else None
    pre = prepace(k, p, Protocol(beats - 1, cycle_length=1000.0), opts, y0=y0, chunk=100)
    pre_wall, pre_cpu = time.perf_counter() - w0, time.process_time() - c0
    rec = record_names(model)
    t, out, st = pace(k, p, Protocol(1, cycle_length=1000.0), opts, rec, y0=pre.y)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    bm = biomarkers_from(t, out, rec)
    ok = (st == 0) & (pre.status == 0)
    res = {k_: float(bm[k_][0]) for k_ in KEYS if k_ in bm}
    res.update(status=int(np.max(np.r_[st, pre.status])), ok=bool(ok.all()), compile_s=round(compile_s, 2),
               wall_s=round(wall, 3), cpu_s=round(cpu, 3), cpu_ms_per_cell_beat=round(1000 * cpu / (beats * cells), 3),
               prepace_cpu_ms_per_cell_beat=round(1000 * pre_cpu / (max(beats - 1, 1) * cells), 3),
               last_beat_sampled_cpu_ms_per_cell=round(1000 * (cpu - pre_cpu) / cells, 2),
               rel_change_last_beat=float(pre.rel_change[0, -1]) if pre.rel_change.shape[1] else None,
               rel_change_by_100=[float(pre.rel_change[0, i]) for i in range(99, pre.rel_change.shape[1], 100)])
    return res


def run_myokit(name: str, beats: int) -> dict | None:
    try:
        import myokit
    except ImportError:
        return None
    f, key, val, _ = MODELS[name]
    m, proto, _ = myokit.load(str(DATA / f))
    m.get(key).set_rhs(val)
    t0 = time.perf_counter()
    sim = myokit.Simulation(m, proto)
    compile_s = time.perf_counter() - t0
    sim.set_tolerance(1e-6, 1e-4)
    ci, _ = load(name)
    w0, c0 = time.perf_counter(), time.process_time()
    sim.pre((beats - 1) * 1000.0)
    pre_cpu = time.process_time() - c0
    state = sim.state()
    offset = ci.stimulus.offset
    grid = beat_grid(offset, 1000.0)
    roles = ci.roles
    log = [roles[r] for r in ["V", "Cai"] + [c for c in QNET_CURRENTS if c in roles]]
    sim.reset()
    sim.set_state(state)
    d = sim.run(grid[-1] + 1e-6, log_times=grid, log=log)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    samples = np.array([np.asarray(d[q]) for q in log])[:, None, :]
    names = ["V", "Cai"] + [c for c in QNET_CURRENTS if c in roles]
    bm = biomarkers_from(grid, samples, names)
    res = {k_: float(bm[k_][0]) for k_ in KEYS if k_ in bm}
    res.update(compile_s=round(compile_s, 2), wall_s=round(wall, 3), cpu_s=round(cpu, 3),
               cpu_ms_per_cell_beat=round(1000 * cpu / beats, 3),
               prepace_cpu_ms_per_cell_beat=round(1000 * pre_cpu / max(beats - 1, 1), 3),
               last_beat_sampled_cpu_ms_per_cell=round(1000 * (cpu - pre_cpu), 2),
               state={v.qname(): float(x) for v, x in zip(m.states(), state)}, myokit=myokit.__version__)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beats", type=int, default=1000)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--methods", nargs="*", default=["rodas4:3e-4", "rodas4:1e-4", "rodas4:1e-3"])
    ap.add_argument("--cells", type=int, default=1)
    ap.add_argument("--no-myokit", action="store_true")
    ap.add_argument("--from-reference", action="store_true",
                    help="start from Myokit's state after 999 beats (myokit_reference.json): a solver study over "
                         "--beats beats, compared with Myokit's beat 1000 on the same grid")
    ap.add_argument("--quick", action="store_true", help="smoke run: one model, 20 beats")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "cardiac_cells.json"))
    a = ap.parse_args(argv)
    if a.quick:
        a.beats, a.models, a.methods = min(a.beats, 20), a.models[:1], a.methods[:1]
    results = {"command": " ".join(["benchmarks/cardiac_cells.py"] + (argv if argv is not None else sys.argv[1:])),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                          f"threads {default_threads()}, Python {platform.python_version()}",
               "beats": a.beats, "cells": a.cells, "date": time.strftime("%Y-%m-%d"), "models": {}}
    cmp_keys = ("APD90", "Vpeak", "Vrest", "CaT_amplitude", "CaTD90", "qNet")

    def line(name, label, r, ref):
        extra = f" rel.change {r['rel_change_last_beat']:.1e}" if r.get("rel_change_last_beat") is not None else ""
        print(f"{name:14s} {label:18s} APD90 {r['APD90']:8.2f} (ref {ref}, d {r['APD90'] - ref:+.2f}) "
              f"Vpeak {r['Vpeak']:6.2f} Vrest {r['Vrest']:7.3f} CPU-ms/cell-beat {r['cpu_ms_per_cell_beat']:.2f} "
              f"(prepace {r['prepace_cpu_ms_per_cell_beat']:.2f}){extra}", flush=True)

    def diff(name, label, what, r, other):
        print(f"{name:14s} {label:18s} vs {what}: " + ", ".join(f"d{k} {r[k] - other[k]:+.3g}" for k in cmp_keys))

    for name in a.models:
        ref = MODELS[name][3]
        row = {"myokit_reference_APD90": ref, "ours": {}}
        for spec in a.methods:
            r = run_ours(name, spec, a.beats, a.cells, a.from_reference)
            row["ours"][spec] = r
            line(name, spec, r, ref)
        if a.from_reference:
            myo = json.loads((DATA / "myokit_reference.json").read_text())["models"][name]["beat_1000"]
            row["myokit_same_grid"] = myo
            for spec, r in row["ours"].items():
                diff(name, spec, "Myokit beat 1000, same grid", r, myo)
        elif not a.no_myokit:
            r = run_myokit(name, a.beats)
            if r is not None:
                row["myokit"] = r
                line(name, "myokit CVODES", r, ref)
                for spec, o in row["ours"].items():
                    diff(name, spec, "Myokit, same run", o, r)
        results["models"][name] = row
    Path(a.out).write_text(json.dumps(results, indent=1))
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
