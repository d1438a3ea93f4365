"""Regenerate myokit_reference.json: Myokit (CVODES) steady states and last-beat biomarkers.

    .venv/bin/python tests/data/cardiac/make_myokit_reference.py

For each model file and cell type used by tests/test_cardiac_cells.py: Myokit Simulation with the
file's own protocol (0.5 ms pulse at 2x threshold, offset 50 ms, cycle 1000 ms), CVODES tolerances
abs 1e-6 / rel 1e-4 (Myokit's defaults), 999 beats of pre-pacing (Simulation.pre), the state at
t = 999 000 ms stored by Myokit qname, then beat 1000 logged on engine.pacing.beat_grid (every
0.01 ms for 20 ms after the stimulus, 0.1 ms after) and measured with engine.pacing.beat_biomarkers.
The test starts our integrator from the stored state, so CI checks one beat instead of 1000.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

import myokit  # noqa: E402

from engine.pacing import beat_biomarkers, beat_grid  # noqa: E402
from kernels.ode.cellml import QNET_CURRENTS, import_mmt_mapped  # noqa: E402

CASES = {  # name -> (file, cell-type constant, value)
    "ord_cipa_endo": ("ohara-cipa-v1-2017.mmt", "cell.mode", 0),
    "ord2011_endo": ("ohara-2011.mmt", "cell.mode", 0),
    "torord_endo": ("tomek-2020.mmt", "cell.mode", 0),
    "tp06_epi": ("tentusscher-2006.mmt", "cell.type", 1),
}
BEATS = 1000
CL = 1000.0


def main() -> None:
    out = {"generator": "tests/data/cardiac/make_myokit_reference.py", "myokit": myokit.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
           "protocol": "file's own stimulus, CL 1000 ms, 999 beats pre-paced, beat 1000 measured",
           "tolerance": {"abs": 1e-6, "rel": 1e-4}, "models": {}}
    for name, (f, key, val) in CASES.items():
        m, proto, _ = myokit.load(str(HERE / f))
        m.get(key).set_rhs(val)
        sim = myokit.Simulation(m, proto)
        sim.set_tolerance(1e-6, 1e-4)
        c0 = time.process_time()
        sim.pre((BEATS - 1) * CL)
        state = sim.state()
        ci = import_mmt_mapped(HERE / f, constants={key: val})
        grid = beat_grid(ci.stimulus.offset, CL)
        names = ["V", "Cai"] + [c for c in QNET_CURRENTS if c in ci.roles]
        sim.reset()
        sim.set_state(state)
        d = sim.run(grid[-1] + 1e-6, log_times=grid, log=[ci.roles[r] for r in names])
        cpu = time.process_time() - c0
        s = {r: np.asarray(d[ci.roles[r]])[None, :] for r in names}
        bm = beat_biomarkers(grid - grid[0], s["V"], s["Cai"], {c: s[c] for c in QNET_CURRENTS if c in s})
        out["models"][name] = {
            "file": f, "constants": {key: val},
            "state_after_999_beats": {v.qname(): float(x) for v, x in zip(m.states(), state)},
            "beat_1000": {k: float(v[0]) for k, v in bm.items()},
            "cpu_s": round(cpu, 2),
        }
        print(name, {k: round(float(v[0]), 3) for k, v in bm.items() if k in ("APD90", "Vpeak", "Vrest", "qNet")})
    (HERE / "myokit_reference.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
