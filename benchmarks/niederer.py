"""Niederer et al. 2011 N-version benchmark: activation times at P1..P9 for dx x dt.

    OMP_NUM_THREADS=1 python benchmarks/niederer.py [--dx 0.5 0.2 0.1] [--dt 0.05 0.01 0.005] [--out benchmarks/niederer.json]

Runs jobs/niederer_benchmark.toml with dx/dt replaced (the diffusion sub-steps raised where dt
exceeds the explicit limit, which only (0.1 mm, 0.05 ms) needs), stopping 1 ms after the last
voxel activated. Each case's result is appended to the JSON file as soon as it finishes, with
the wall time, time per step and node-updates/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import parse_job  # noqa: E402
from engine.tissue.geometry import max_stable_dt  # noqa: E402
from engine.tissue.setup import make_plan  # noqa: E402
from engine.tissue.simulate import simulate  # noqa: E402
from kernels.tissue.build import tissue_kernels  # noqa: E402


def case(dx: float, dt: float, backend: str, tables: bool = False) -> dict:
    job = ROOT / "jobs" / "niederer_benchmark.toml"
    text = job.read_text().replace("dx = 0.5", f"dx = {dx}").replace("dt = 0.05", f"dt = {dt}")
    text = text.replace("end_time = 200.0", "end_time = 400.0")
    loaded = parse_job(text, str(job), job)
    # substeps: probe the limit with a throwaway plan at 1000 substeps, then set the smallest stable count
    probe = make_plan(parse_job(text.replace("end_time = 400.0", "end_time = 400.0\ndiffusion_substeps = 1000"),
                                str(job), job))
    sub = max(1, math.ceil(dt / max_stable_dt(probe.geom) - 1e-12))
    if sub > 1:
        text = text.replace("end_time = 400.0", f"end_time = 400.0\ndiffusion_substeps = {sub}")
        loaded = parse_job(text, str(job), job)
    plan = make_plan(loaded)
    ts = loaded.job.tissue
    k = tissue_kernels(plan.model, backend, tables)
    r = simulate(plan.geom, plan.model, plan.params, k, plan.stimuli, dt, ts.end_time, sub, None, plan.points,
                 1.0, (), thr_act=0.0, stop_after_activation=1.0)
    act = {n: round(float(r.maps.activation[ijk]), 3) for n, ijk in plan.points.items()}
    return {"dx_mm": dx, "dt_ms": dt, "lookup_tables": tables, "diffusion_substeps": sub, "grid": list(plan.geom.shape),
            "activation_ms": act, "t_end_ms": r.t_end, **{k_: r.stats[k_] for k_ in
                                                          ("steps", "wall_s", "ms_per_step", "node_updates_per_s",
                                                           "tissue_voxels")}}


def table(rec: dict) -> str:
    """Markdown: activation times per case, and the 11-code mean +- SD of the paper at dt 0.01 ms."""
    ref = json.loads((ROOT / "tests" / "data" / "tissue" / "niederer_reference.json").read_text())
    pts = [f"P{i}" for i in range(1, 10)]
    out = ["| dx mm | dt ms | " + " | ".join(pts) + " | steps | wall s | M node-updates/s |",
           "|---:|---:|" + "---:|" * (len(pts) + 3)]
    for c in sorted([c for c in rec["cases"] if not c.get("lookup_tables")], key=lambda c: (-c["dx_mm"], -c["dt_ms"])):
        sub = f" ({c['diffusion_substeps']} diffusion sub-steps)" if c["diffusion_substeps"] > 1 else ""
        out.append(f"| {c['dx_mm']} | {c['dt_ms']}{sub} | " + " | ".join(f"{c['activation_ms'][p]:.2f}" for p in pts)
                   + f" | {c['steps']} | {c['wall_s']:.0f} | {c['node_updates_per_s'] / 1e6:.2f} |")
    for dx, row in sorted(ref["by_dx"].items(), key=lambda kv: -float(kv[0])):
        out.append(f"| {dx} | paper, 11 codes, 0.01 | " + " | ".join(f"{row[p][0]:.1f} ± {row[p][1]:.1f}" for p in pts)
                   + " | | | |")
    exact = {(c["dx_mm"], c["dt_ms"]): c for c in rec["cases"] if not c.get("lookup_tables")}
    tab = sorted([c for c in rec["cases"] if c.get("lookup_tables")], key=lambda c: (-c["dx_mm"], -c["dt_ms"]))
    if tab:
        out += ["", "With lookup tables (`lookup_tables = true`, the job default):", "",
                "| dx mm | dt ms | " + " | ".join(pts) + " | max abs diff vs exact ms | steps | wall s "
                "| M node-updates/s |", "|---:|---:|" + "---:|" * (len(pts) + 4)]
        for c in tab:
            e = exact.get((c["dx_mm"], c["dt_ms"]))
            d = f"{max(abs(c['activation_ms'][p] - e['activation_ms'][p]) for p in pts):.3f}" if e else "n/a"
            out.append(f"| {c['dx_mm']} | {c['dt_ms']} | " + " | ".join(f"{c['activation_ms'][p]:.2f}" for p in pts)
                       + f" | {d} | {c['steps']} | {c['wall_s']:.0f} | {c['node_updates_per_s'] / 1e6:.2f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", action="store_true", help="print the Markdown table of --out and exit")
    ap.add_argument("--dx", type=float, nargs="+", default=[0.5, 0.2, 0.1])
    ap.add_argument("--dt", type=float, nargs="+", default=[0.05, 0.01, 0.005])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--tables", action="store_true", help="cell step with lookup tables (default: exact formulas)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "niederer.json"))
    a = ap.parse_args()
    out = Path(a.out)
    if a.table:
        print(table(json.loads(out.read_text())))
        return
    rec = json.loads(out.read_text()) if out.exists() else {"cases": []}
    rec["machine"] = {"cpu": platform.processor() or platform.machine(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                      "backend": a.backend}
    for dx in a.dx:
        for dt in a.dt:
            t0 = time.time()
            c = case(dx, dt, a.backend, a.tables)
            c["omp_threads"], c["load_average_1min"] = os.environ.get("OMP_NUM_THREADS"), os.getloadavg()[0]
            rec["cases"] = [x for x in rec["cases"] if (x["dx_mm"], x["dt_ms"], bool(x.get("lookup_tables")))
                            != (dx, dt, a.tables)] + [c]
            out.write_text(json.dumps(rec, indent=1))
            print(f"dx {dx} dt {dt}: {c['activation_ms']} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
