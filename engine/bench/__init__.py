"""`twin bench`: the benchmark suite (floors, kernels, end-to-end jobs, MPI scaling, IO).

    twin bench --quick --out bench/        # < 5 min on 2 cores: bench.json + bench.md
    twin bench --out bench/                # default sizes, for a real machine
    twin bench --smoke --out /tmp/b        # seconds: the schema check the tests run
    twin bench --only io,floor             # sections: floor, kernels, e2e, scaling, io

Every number is measured by the suite in this process (peers too) or by the subprocesses it
launches (scaling); nothing is taken from a data sheet. See the modules for what is counted:
floors.py (FLOP/s and memory floors), flops.py (counted flops), cases.py (kernel cases and
families), jobs.py (end-to-end and scaling), io.py (HDF5 vs raw write).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("floor", "kernels", "e2e", "scaling", "io")
SCHEMA = "twin-bench/1"

# sizes per mode; "ours" = our compiled kernel, subsets for the NumPy reference and peers
SIZES = {
    "smoke": {
        "floor": {"seconds": 0.02, "mem_mib": 16, "blas_n": 256},
        "kernels": {"reps": 1, "only": ["pk", "monodomain"],
                    "tissue": {"dx": 0.5, "steps": 8, "numpy_steps": 2, "warmup": 100},
                    "pk": {"ours": 200, "numpy": 10, "scipy": 2, "diffrax": 10}},
        "e2e": {"n": 1000, "chunk": 250, "count": 20},
        "scaling": {"ranks": [1, 2], "strong_n": 1000, "weak_per_rank": 500, "chunk": 250, "reps": 1},
        "io": {"chunk_rows": [250], "total_mb": 4, "reps": 1},
        "peers": ["scipy"],
    },
    "quick": {
        "floor": {"seconds": 0.15, "mem_mib": 128, "blas_n": 1024},
        "kernels": {"reps": 3,
                    "lorenz": {"ours": 10_000, "numpy": 500, "scipy": 20, "diffrax": 1000},
                    "pk": {"ours": 10_000, "numpy": 200, "scipy": 10, "diffrax": 1000},
                    "uva": {"ours": 1000, "numpy": 30, "scipy": 2, "diffrax": 100},
                    "cells": {"beats": 40, "cells": 8, "myokit_beats": 40},
                    "tissue": {"dx": 0.2, "steps": 40, "numpy_steps": 2, "warmup": 200},
                    "ligands": {"exhaustiveness": 4}},
        "e2e": {"n": 20_000, "chunk": 1000, "count": 100},
        "scaling": {"ranks": [1, 2, 4], "strong_n": 32_000, "weak_per_rank": 16_000, "chunk": 1000, "reps": 1},
        "io": {"chunk_rows": [1000, 4000], "total_mb": 256, "reps": 3},
        "peers": ["scipy", "diffrax", "torchdiffeq", "myokit", "vina"],
    },
    "full": {
        "floor": {"seconds": 0.5, "mem_mib": 1024, "blas_n": 4096},
        "kernels": {"reps": 3,
                    "lorenz": {"ours": 100_000, "numpy": 2000, "scipy": 200, "diffrax": 10_000},
                    "pk": {"ours": 100_000, "numpy": 1000, "scipy": 100, "diffrax": 10_000},
                    "uva": {"ours": 10_000, "numpy": 30, "scipy": 3, "diffrax": 1000},
                    "cells": {"beats": 200, "cells": 64, "myokit_beats": 200},
                    "tissue": {"dx": 0.1, "steps": 100, "numpy_steps": 2, "warmup": 200},
                    "ligands": {"exhaustiveness": 8}},
        "e2e": {"n": 100_000, "chunk": 1000, "count": 500},
        "scaling": {"ranks": [1, 2, 4], "strong_n": 200_000, "weak_per_rank": 100_000, "chunk": 1000, "reps": 2},
        "io": {"chunk_rows": [1000, 10_000], "total_mb": 1024, "reps": 3},
        "peers": ["scipy", "diffrax", "torchdiffeq", "myokit", "vina"],
    },
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small sizes: under 5 minutes on 2 cores")
    g.add_argument("--smoke", action="store_true", help="tiny sizes: a schema check in seconds (tests)")
    p.add_argument("-o", "--out", default="bench", help="directory for bench.json and bench.md (default ./bench)")
    p.add_argument("--only", help=f"comma-separated sections to run ({','.join(SECTIONS)}); default all")
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "numpy"],
                   help="our kernel backend for the kernel, end-to-end and scaling sections (default cpu)")
    p.add_argument("--ranks", help="MPI rank counts for scaling, e.g. 1,2,4 (default per mode)")
    p.add_argument("--launcher", help="MPI launcher, e.g. 'srun -n {n}' on a cluster (default: mpiexec -n K)")
    p.add_argument("--threads-per-rank", type=int, default=1, help="OMP_NUM_THREADS of each rank in scaling (default 1)")
    p.add_argument("--peers", help="peers to run where installed (scipy,diffrax,torchdiffeq,myokit,vina); 'none' for none")


def run(args: argparse.Namespace) -> int:
    from ..errors import TwinError
    from . import report

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = json.loads(json.dumps(SIZES[mode]))
    only = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        raise TwinError(f"--only: unknown section(s) {bad}; allowed: {', '.join(SECTIONS)}")
    if args.ranks:
        try:
            sizes["scaling"]["ranks"] = [int(x) for x in args.ranks.split(",")]
        except ValueError:
            raise TwinError(f"--ranks {args.ranks!r}: give rank counts like 1,2,4") from None
    peers = set(sizes["peers"]) if args.peers is None else (
        set() if args.peers == "none" else {p.strip() for p in args.peers.split(",")})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # scratch space beside the results (same file system: IO is measured where the results go)
    work = Path(tempfile.mkdtemp(prefix=".twin-bench-", dir=out))

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    cpu0 = _cpu_times()
    from kernels.compile import default_threads

    from ..backend import resolve

    backend = resolve(args.backend).name  # refuses a backend that cannot run here (one line, exit 2)
    threads = default_threads()
    res: dict = {"schema": SCHEMA, "meta": _meta(mode, args, threads, backend, only)}

    state: dict = {"floors": None}

    def floor_section():
        from . import floors as fm

        log("floors: FLOP/s and memory bandwidth")
        f = sizes["floor"]
        state["floors"] = fm.measure(threads, f["seconds"], f["mem_mib"], f["blas_n"])
        return state["floors"]

    def kernels_section():
        from .cases import Ctx, kernel_cases, run_cases

        cases = kernel_cases()
        keep = sizes["kernels"].get("only")
        if keep:
            cases = [c for c in cases if c.run is None or c.name in keep]
        ctx = Ctx(sizes=sizes, backend=backend, threads=threads, floors=state["floors"], peers=peers, log=log)
        return run_cases(cases, ctx)

    def e2e_section():
        from . import jobs
        from .cases import fraction

        e = sizes["e2e"]
        log(f"e2e: twin run of {e['n']} patients in this process")
        r = jobs.end_to_end(work, e["n"], e["chunk"], backend, threads, e["count"])
        thr = {"cpu": threads, "numpy": 1}.get(backend)
        r["threads"] = thr
        r.update(fraction(r["gflops"], None, state["floors"], thr) if thr else {"fraction_of_floor": None})
        return r

    def scaling_section():
        from . import jobs

        s = sizes["scaling"]
        return jobs.scaling(work, s["ranks"], s["strong_n"], s["weak_per_rank"], s["chunk"], backend,
                            args.threads_per_rank, args.launcher, s["reps"], log)

    def io_section():
        from . import io, jobs

        s = sizes["io"]
        job = jobs.write_job(work / "io_job.toml", max(s["chunk_rows"]), max(s["chunk_rows"]), "numpy")
        return io.measure(work / "io", job, s["chunk_rows"], s["total_mb"], s["reps"], log)

    # the floors are what kernel and end-to-end fractions are measured against: run them for those too
    todo = [("floors", floor_section)] if {"floor", "kernels", "e2e"} & set(only) else []
    todo += [(k, f) for k, f in (("kernels", kernels_section), ("e2e", e2e_section), ("scaling", scaling_section),
                                 ("io", io_section)) if k in only]
    failed = []
    try:
        for key, fn in todo:
            try:
                res[key] = fn()
            except Exception as e:  # noqa: BLE001 - one broken section must not lose the others' numbers
                import traceback

                traceback.print_exc()
                log(f"{key}: FAILED ({e.__class__.__name__}: {e})")
                res[key] = {"error": f"{e.__class__.__name__}: {e}"}
                failed.append(key)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["meta"]["runtime_s"] = time.perf_counter() - t_start
    cpu1 = _cpu_times()
    if cpu0 and cpu1 and sum(cpu1) > sum(cpu0):
        # time the hypervisor ran something else on our vCPUs: timings on a shared VM are noisier
        res["meta"]["cpu_steal_fraction"] = (cpu1[7] - cpu0[7]) / (sum(cpu1) - sum(cpu0))
    (out / "bench.json").write_text(json.dumps(res, indent=1, default=_jsonable))
    md = report.markdown(res)
    (out / "bench.md").write_text(md)
    print(md)
    log(f"wrote {out / 'bench.json'} and {out / 'bench.md'} in {res['meta']['runtime_s']:.0f} s"
        + (f"; sections that failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _cpu_times() -> list[int] | None:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v if len(v) >= 8 else None
    except (OSError, ValueError):
        return None


def _jsonable(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _meta(mode, args, threads, backend, only) -> dict:
    import numpy as np

    from ..backend import cpu_name
    from ..provenance import git_revision, utc_now

    cmd = "twin bench" + (" --quick" if mode == "quick" else " --smoke" if mode == "smoke" else "")
    if args.only:
        cmd += f" --only {args.only}"
    m = {"command": cmd, "mode": mode, "sections": list(only), "date": utc_now(), "host": socket.gethostname(),
         "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
         "threads": threads, "backend": backend, "python": platform.python_version(), "numpy": np.__version__,
         "platform": platform.platform(), "git_revision": git_revision(),
         "loadavg_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        import h5py

        m["h5py"], m["hdf5"] = h5py.version.version, h5py.version.hdf5_version
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            m["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return m
