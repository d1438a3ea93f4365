"""Time per step and node-updates/s of the monodomain kernels, against the machine's floors.

    OMP_NUM_THREADS=1 python benchmarks/tissue_perf.py [--dx 0.1] [--steps 20] [--out FILE]

Runs the three kernels of one step (cell, diffusion, tracking) on the Niederer slab at `dx` (the
TP06 epi cell model, fibres along x: no cross terms) from a state mid-upstroke, and reports per
kernel the time per node-update, the bytes each node moves (float64, counted from tissue.c: the
arrays read and written once per node; stencil neighbours come from cache), the counted flops
(expression-tree rules of engine/bench/flops.py) and the floors: bandwidth floor = bytes x nodes /
copy bandwidth (measured here, engine/bench/floors.memory_floor), compute floor = flops / scalar
FMA rate (engine/bench/floors.flop_floor; the per-voxel kernel is scalar code).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.bench.flops import expr_flops, rhs_flops  # noqa: E402
from engine.bench.floors import flop_floor, memory_floor  # noqa: E402
from engine.config import parse_job  # noqa: E402
from engine.tissue.setup import make_plan  # noqa: E402
from engine.tissue.solver import TissueSolver  # noqa: E402
from kernels.ode.symbolic import gating  # noqa: E402
from kernels.tissue.build import tissue_kernels  # noqa: E402


def table_flops(model) -> int:
    """Counted flops of the lookup-table cell step: the rewritten intermediates and updates, 3 per
    interpolated column, 2 per tabulated gate (y E + G), 10 for the row index."""
    from kernels.ode.symbolic import _str
    from kernels.tissue.build import table_plan

    plan = table_plan(model)
    n = sum(expr_flops(_str(t))[0] for _, t in plan.body)
    for u in plan.updates:
        n += 2 if u[0] == "lut" else sum(expr_flops(_str(t))[0] for t in u[1:]) + (8 if u[0] == "rl" else 2)
    return n + 3 * plan.n_columns + 10


def counts(model, cross: bool) -> dict:
    ns = len(model.states)
    gates = gating(model)
    rl = sum(expr_flops(b)[0] for _, b in gates.values())
    cell_flops = rhs_flops(model)["flops"] + rl + 8 * ns  # + per state: z, |z|<, expm1, /z, y + dt*(f*phi)
    # per axis: 2 faces x (Dface 2, difference 1, x D 1, / h 1) + (Fp - Fm) / h 2 = 12; + V + dt*lap 2
    # cross terms: per face and other axis: 2 gradient sums of 3 + 2 mirror selects + Dab face 2 + madd 2
    diff_flops = 3 * 12 + 2 + (3 * 2 * 2 * (3 * 2 + 2 + 4) if cross else 0)
    track_flops = 8
    return {
        "cell": {"bytes": ns * 8 + ns * 8 + 1 + 1, "flops": cell_flops,
                 "note": f"read {ns} states, write {ns - 1} states + Vs, mask, stim id"},
        "cell_tables": {"bytes": ns * 8 + ns * 8 + 1 + 1, "flops": table_flops(model),
                        "note": "as cell; the V lookup table (a few rows per voxel) stays in cache"},
        "diffuse": {"bytes": 8 + 1 + 3 * 8 + (3 * 8 if cross else 0) + 8, "flops": diff_flops,
                    "note": "read Vs, mask, D diagonal (+ off-diagonal if cross terms), write V"},
        "track": {"bytes": 8 + 16 + 4 * 8 + 4 + 1, "flops": track_flops,
                  "note": "read V, read/write Vprev, 4 time maps, activation count, mask"},
    }


def _copy_time(Y0: np.ndarray, steps: int) -> float:
    Y = np.empty_like(Y0)
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            Y[:] = Y0
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dx", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "tissue_perf.json"))
    a = ap.parse_args()
    job = ROOT / "jobs" / "niederer_benchmark.toml"
    text = job.read_text().replace("dx = 0.5", f"dx = {a.dx}").replace("dt = 0.05", "dt = 0.005")
    plan = make_plan(parse_job(text, str(job), job))
    k = tissue_kernels(plan.model, "cpu")
    kt = tissue_kernels(plan.model, "cpu", tables=True)
    s = TissueSolver(plan.geom, plan.model, plan.params, k, plan.stimuli, 0.005)
    for _ in range(200):  # into the stimulus: realistic gate values, not the resting state
        s.step()
    n_tissue = int(plan.geom.mask.sum())
    amp = np.array([0.0])
    Y0 = s.Y.copy()

    def cell(kk):
        s.Y[:] = Y0  # the same state every repetition (a step is cheap to undo, and cost depends on state)
        kk.cell(s.mask, s.Y, s.Vs, s.p, s.stim_id, amp, s.t, s.dt, s.vidx)

    kern = {
        "cell": lambda: cell(k),
        "cell_tables": lambda: cell(kt),
        "diffuse": lambda: k.diffuse(s.shape, s.mask, s.Vs, s.V2, s.D6, s.h3, s.dt, s.cross),
        "track": lambda: k.track(s.mask, s.Y[s.vidx], s.Vprev, s.act1, s.act2, s.rep, s.apd, s.nact, s.t, s.dt,
                                 0.0, -70.0),
    }
    import os

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    mem = memory_floor(threads)
    fl = flop_floor(threads)
    bw = mem["copy_gbs"] * 1e9
    scalar = fl["scalar_gflops"] * 1e9
    c = counts(plan.model, s.cross)
    rows = {}
    for name, f in kern.items():
        f()
        ts, cs = [], []
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(a.steps):
                f()
            ts.append((time.perf_counter() - t0) / a.steps)
            cs.append((time.process_time() - c0) / a.steps)
        t = min(ts)
        # CPU seconds of this process: on a shared machine wall time also counts other jobs' time
        # slices; with one thread, CPU time is the kernel's own cost
        rows[name] = {**c[name], "s_per_step": t, "cpu_s_per_step": min(cs), "ns_per_node": 1e9 * t / n_tissue,
                      "cpu_ns_per_node": 1e9 * min(cs) / n_tissue,
                      "bandwidth_floor_s": c[name]["bytes"] * s.n / bw,
                      "compute_floor_s": c[name]["flops"] * n_tissue / scalar}
    # the cell row (self.Y reset included) pays a copy of the state per repetition: take it out
    t_copy = _copy_time(Y0, a.steps)
    for name in ("cell", "cell_tables"):
        rows[name]["s_per_step"] -= t_copy
        rows[name]["ns_per_node"] = 1e9 * rows[name]["s_per_step"] / n_tissue
    steps = {}
    for label, cell_row in (("step", "cell"), ("step_tables", "cell_tables")):
        parts = [rows[cell_row], rows["diffuse"], rows["track"]]
        tot = {k_: sum(r[k_] for r in parts) for k_ in ("s_per_step", "cpu_s_per_step", "bandwidth_floor_s",
                                                         "compute_floor_s", "bytes", "flops")}
        tot["node_updates_per_s"] = n_tissue / tot["s_per_step"]
        tot["node_updates_per_cpu_s"] = n_tissue / tot["cpu_s_per_step"]
        tot["x_bandwidth_floor"] = tot["s_per_step"] / tot["bandwidth_floor_s"]
        tot["x_compute_floor"] = tot["s_per_step"] / tot["compute_floor_s"]
        steps[label] = tot
    out = {"dx_mm": a.dx, "grid": list(plan.geom.shape), "tissue_voxels": n_tissue, "padded_nodes": s.n,
           "threads": threads, "copy_gbs": mem["copy_gbs"], "scalar_gflops": fl["scalar_gflops"],
           "load_average_1min": os.getloadavg()[0], "state_copy_s_subtracted": t_copy, "kernels": rows, **steps}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
