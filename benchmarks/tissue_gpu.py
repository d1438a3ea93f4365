"""The issue's GPU target for the tissue kernels: the Niederer slab at dx 0.1 mm, dt 0.005 ms,
100 ms (20,000 steps x 442,401 voxels = 8.8e9 node-updates) on one GPU, target <= 2 s.

    python benchmarks/tissue_gpu.py [--end 100] [--exact] [-o out.json]

Runs `simulate` on the cuda backend (cell step with lookup tables unless --exact), reports wall
time, node-updates/s and the bandwidth floor (408 B per node-update, counted in
benchmarks/tissue_perf.py, over the device's peak memory bandwidth from its attributes), and
compares the activation times at P1-P9 with the cpu record in benchmarks/niederer.json (dx 0.1,
dt 0.005). Exits 2 with the reason when CuPy or a GPU is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BYTES_PER_NODE = 408  # benchmarks/tissue_perf.py: cell 306 + diffusion 41 + tracking 61


def _peak_bandwidth(cp, dev) -> float | None:
    """Bytes/s: 2 (DDR) x memory clock x bus width / 8, from the device properties or attributes
    (CUDA 13 dropped the property fields; the attributes 36/37 remain); None if unavailable."""
    clk, bus = dev.get("memoryClockRate"), dev.get("memoryBusWidth")
    try:
        clk = clk or cp.cuda.runtime.deviceGetAttribute(36, 0)  # cudaDevAttrMemoryClockRate, kHz
        bus = bus or cp.cuda.runtime.deviceGetAttribute(37, 0)  # cudaDevAttrGlobalMemoryBusWidth, bits
    except Exception:  # noqa: BLE001 - attribute not available in this runtime
        return None
    return 2 * clk * 1e3 * bus / 8 if clk and bus else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--end", type=float, default=100.0)
    ap.add_argument("--exact", action="store_true", help="exact cell formulas instead of lookup tables")
    ap.add_argument("-o", "--out", default=None)
    a = ap.parse_args()
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
    except Exception as e:  # noqa: BLE001 - any missing piece means: no GPU here
        print(f"tissue_gpu: cannot run on cuda here ({e})", file=sys.stderr)
        return 2
    import numpy as np

    from engine.config import parse_job
    from engine.tissue.setup import make_plan
    from engine.tissue.simulate import simulate
    from kernels.tissue.build import tissue_kernels

    job = ROOT / "jobs" / "niederer_benchmark.toml"
    text = job.read_text().replace("dx = 0.5", "dx = 0.1").replace("dt = 0.05", "dt = 0.005")
    plan = make_plan(parse_job(text, str(job), job))
    k = tissue_kernels(plan.model, "cuda", not a.exact)
    # warm-up: compile, build the table, first launches
    simulate(plan.geom, plan.model, plan.params, k, plan.stimuli, 0.005, 0.05, points=plan.points, xp=cp)
    cp.cuda.runtime.deviceSynchronize()
    r = simulate(plan.geom, plan.model, plan.params, k, plan.stimuli, 0.005, a.end, points=plan.points,
                 trace_every=1.0, xp=cp)
    cp.cuda.runtime.deviceSynchronize()
    dev = cp.cuda.runtime.getDeviceProperties(0)
    n = int(plan.geom.mask.sum())
    peak = _peak_bandwidth(cp, dev)
    floor = BYTES_PER_NODE * n * r.steps / peak if peak else float("nan")
    rec = {"device": dev["name"].decode() if isinstance(dev["name"], bytes) else str(dev["name"]),
           "lookup_tables": not a.exact, "end_ms": a.end, "steps": r.steps, "tissue_voxels": n,
           "wall_s": r.wall_s, "node_updates_per_s": n * r.steps / r.wall_s, "peak_bandwidth_gbs": peak / 1e9 if peak else None,
           "bandwidth_floor_s": floor, "x_bandwidth_floor": r.wall_s / floor, "target_s": 2.0 * a.end / 100.0}
    cpu = json.loads((ROOT / "benchmarks" / "niederer.json").read_text())["cases"]
    ref = [c for c in cpu if c["dx_mm"] == 0.1 and c["dt_ms"] == 0.005 and not c.get("lookup_tables")]
    if ref and a.end >= 50:
        act = {p: float(r.maps.activation[ijk]) for p, ijk in plan.points.items()}
        rec["activation_ms"] = act
        rec["max_abs_diff_vs_cpu_exact_ms"] = max(abs(act[p] - ref[0]["activation_ms"][p]) for p in act
                                                  if np.isfinite(act[p]))
    print(json.dumps(rec, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
