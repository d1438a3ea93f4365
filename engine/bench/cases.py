"""Benchmark cases: one `Case` per workload, grouped by family (the unit of throughput).

Families and their units: patients (patients/s), cell-beats (cell-beats/s), node-updates
(node-updates/s: the monodomain tissue solver), ligands (ligands/s). Cases declared without a runner
print "n/a (not built yet)" rows instead of numbers. A new family plugs in by adding a `Case` with a `run(ctx)` that returns rows
of the same schema (see `row()`): ours first, then each peer run in the same process.

The patient-family kernel cases and their peers (SciPy solve_ivp loop, Diffrax, torchdiffeq) are
the ones of `benchmarks/ensemble.py`, imported from the source tree, not copied.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import flops as fl

ROOT = Path(__file__).resolve().parents[2]
ENSEMBLE = ROOT / "benchmarks" / "ensemble.py"
CARDIAC = ROOT / "benchmarks" / "cardiac_cells.py"
REDOCK = ROOT / "benchmarks" / "docking_redock.py"
TISSUE_PERF = ROOT / "benchmarks" / "tissue_perf.py"
NIEDERER_JOB = ROOT / "jobs" / "niederer_benchmark.toml"
DOCK_DATA = ROOT / "tests" / "data" / "docking"

FAMILIES = {"patients": "patients/s", "cell-beats": "cell-beats/s", "node-updates": "node-updates/s",
            "ligands": "ligands/s"}
NOT_BUILT = "n/a (not built yet)"


@dataclass
class Case:
    family: str
    name: str
    title: str
    run: Callable[["Ctx"], list[dict]] | None = None  # None: the family/case is not built yet
    peers: tuple[str, ...] = ()  # peers this case is compared with (import names)

    @property
    def unit(self) -> str:
        return FAMILIES[self.family]


@dataclass
class Ctx:
    sizes: dict
    backend: str
    threads: int
    floors: dict | None
    peers: set[str]
    log: Callable[[str], None] = print
    extra: dict = field(default_factory=dict)


def peer_version(mod: str) -> str | None:
    """Version of an installed peer package (from its metadata, without importing it), or None."""
    if importlib.util.find_spec(mod) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(mod)
    except PackageNotFoundError:
        return "installed"


_ens = None


def _script(path: Path, name: str):
    """A benchmark script of the source tree as a module (imported once), or None outside a checkout."""
    if name not in sys.modules and path.is_file():
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules.get(name)


def cardiac():
    """benchmarks/cardiac_cells.py (model set-up, solver specs)."""
    return _script(CARDIAC, "twin_benchmarks_cardiac")


def tissue_perf():
    """benchmarks/tissue_perf.py (bytes and counted flops per node of the tissue kernels)."""
    return _script(TISSUE_PERF, "twin_benchmarks_tissue_perf")


def redock():
    """benchmarks/docking_redock.py (our docking and AutoDock Vina, one complex at a time)."""
    return _script(REDOCK, "twin_benchmarks_redock")


def ensemble():
    """benchmarks/ensemble.py as a module (case builders and peer runners), or None outside a checkout."""
    global _ens
    if _ens is None and ENSEMBLE.is_file():
        spec = importlib.util.spec_from_file_location("twin_benchmarks_ensemble", ENSEMBLE)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        _ens = mod
    return _ens


def row(case: Case, peer: str, n: int | None, wall: float | None, cpu: float | None = None, **kw) -> dict:
    r = {"family": case.family, "case": case.name, "title": case.title, "peer": peer, "unit": case.unit,
         "n": n, "wall_s": wall, "cpu_s": cpu,
         "throughput": (n / wall) if (n and wall) else None, "status": "ok"}
    r.update(kw)
    return r


def na_row(case: Case, peer: str, status: str, note: str = "") -> dict:
    return {"family": case.family, "case": case.name, "title": case.title, "peer": peer, "unit": case.unit,
            "n": None, "wall_s": None, "cpu_s": None, "throughput": None, "status": status, "note": note}


def fraction(gflops: float | None, ai: float | None, floors: dict | None, threads: int) -> dict:
    """Achieved counted GFLOP/s against the measured roofline for `threads` threads."""
    if gflops is None or floors is None:
        return {"floor": None, "fraction_of_floor": None}
    f, m = floors["flops"], floors["memory"]
    vec = f.get(f"vector_{threads}t_gflops", f["vector_gflops"] * threads / max(f["threads"], 1))
    sca = f.get(f"scalar_{threads}t_gflops", f["scalar_gflops"] * threads / max(f["threads"], 1))
    bw = m["copy_gbs"] if threads > 1 else m["copy_1t_gbs"]
    balance = vec / bw
    if ai is not None and ai < balance:  # memory-bound: the floor is bandwidth × intensity
        return {"floor": f"memory {bw:.1f} GB/s × {ai:.2f} flop/B", "floor_gflops": bw * ai,
                "fraction_of_floor": gflops / (bw * ai), "fraction_of_scalar_floor": None}
    return {"floor": f"FLOP/s vector FMA, {threads} thread(s)", "floor_gflops": vec,
            "fraction_of_floor": gflops / vec, "fraction_of_scalar_floor": gflops / sca}


def _bytes_per_patient(case: dict) -> float:
    P = case["P"]
    ev = case["events"]
    n = P.shape[1]
    ev_b = (ev.time.nbytes + ev.kind.nbytes + ev.target.nbytes + ev.value.nbytes) / max(n, 1)
    return P.shape[0] * 8 + ev_b + len(case["record"]) * len(case["times"]) * 8 + 1


# ---------------------------------------------------------------- patient-family ODE kernel cases
def _ode_case(name: str, title: str, maker: str, size_key: str) -> Case:
    c = Case("patients", name, title, peers=("scipy", "diffrax", "torchdiffeq"))

    def run(ctx: Ctx) -> list[dict]:
        ens = ensemble()
        if ens is None:
            return [na_row(c, "twin", "n/a", f"{ENSEMBLE.relative_to(ROOT)} not in this installation")]
        sz = ctx.sizes["kernels"][size_key]
        big, n_np, n_sp, n_dx = sz["ours"], sz["numpy"], sz["scipy"], sz["diffrax"]
        case = getattr(ens, maker)(big)
        model = case["model"]
        rows = []
        # ours, compiled: best of `reps` after one warm-up (C compile is cached on disk)
        ens.run_ours(case, ctx.backend)
        best = None
        for _ in range(ctx.sizes["kernels"]["reps"]):
            out, w, cpu = ens.run_ours(case, ctx.backend)
            if best is None or w < best[1]:
                best = (out, w, cpu)
        ours, w, cpu = best
        # ours, NumPy reference on a subset, with RHS evaluations counted
        sub = {**case, "P": case["P"][:, :n_np], "events": ens._cut(case["events"], n_np)}
        with fl.count_rhs_evaluations() as cnt:
            _, w_np, cpu_np = ens.run_ours(sub, "numpy")
        fpp = fl.flops_per_patient(model, "dopri5", cnt["evals"], n_np)
        bpp = _bytes_per_patient(case)
        ai = fpp["flops_per_patient"] / bpp
        g = fpp["flops_per_patient"] * big / w / 1e9
        thr = {"cpu": ctx.threads, "numpy": 1}.get(ctx.backend)  # cuda: no GPU floor is measured
        label = f"twin {ctx.backend} ({thr} thread{'s' if thr != 1 else ''})" if thr else f"twin {ctx.backend}"
        fr = fraction(g, ai, ctx.floors, thr) if thr else {"floor": "not measured for this device",
                                                             "fraction_of_floor": None}
        rows.append(row(c, label, big, w, cpu, ours=True, gflops=g, flops_per_patient=fpp["flops_per_patient"],
                        arithmetic_intensity=ai, bytes_per_patient=bpp, counting=fpp, **fr))
        g_np = fpp["flops_per_patient"] * n_np / w_np / 1e9
        rows.append(row(c, "twin numpy (1 thread, RHS counted)", n_np, w_np, cpu_np, gflops=g_np,
                        flops_per_patient=fpp["flops_per_patient"], arithmetic_intensity=ai,
                        **fraction(g_np, ai, ctx.floors, 1)))
        ours_rate = big / w

        def peer(label, mod, fn, k):
            if mod not in ctx.peers:
                rows.append(na_row(c, label, "skipped", "not asked for (--peers)"))
                return
            ver = peer_version(mod)
            if ver is None:
                rows.append(na_row(c, label, "not installed"))
                return
            ctx.log(f"  {c.name}: {label} on {k} patients")
            try:
                res, pw, pc = fn(k)
            except Exception as e:  # noqa: BLE001 - a peer that breaks is reported, not fatal
                rows.append(na_row(c, f"{label} {ver}", "error", f"{e.__class__.__name__}: {str(e)[:200]}"))
                return
            d = ens.agree(ours[:k], np.asarray(res), mod)
            rows.append(row(c, f"{label} {ver}", k, pw, pc, max_rel_diff=d, ours_speedup=ours_rate / (k / pw)))

        peer("SciPy solve_ivp loop (RK45)", "scipy", lambda k: ens.run_scipy(case, k), n_sp)
        peer("Diffrax Dopri5 (jax vmap, CPU)", "diffrax", lambda k: ens.run_diffrax(case, k), n_dx)
        if name == "uva":
            rows.append(na_row(c, "torchdiffeq dopri5 (batched)", "skipped",
                               "1440 per-minute odeint restarts: minutes even for a few patients"))
        else:
            peer("torchdiffeq dopri5 (batched, CPU)", "torchdiffeq",
                 lambda k: ens.run_torchdiffeq(case, k, "cpu"), n_dx)
        for r in rows:
            r["rtol"], r["atol"] = case["rtol"], case["atol"]
        return rows

    c.run = run
    return c


# ---------------------------------------------------------------- cell-beat family
def _cell_case() -> Case:
    c = Case("cell-beats", "cardiac_cell", "ORd-CiPA endo at 1 Hz from Myokit's steady state, Rodas4 rtol 3e-4 "
             "(Myokit: CVODES rtol 1e-6 atol 1e-4)", peers=("myokit",))

    def run(ctx: Ctx) -> list[dict]:
        cb = cardiac()
        if cb is None:
            return [na_row(c, "twin", "n/a", f"{CARDIAC.relative_to(ROOT)} not in this installation")]
        from engine.pacing import Protocol, prepace

        sz = ctx.sizes["kernels"]["cells"]
        beats, cells = sz["beats"], sz["cells"]
        ci, _ = cb.load("ord_cipa_endo")
        k = ode_kernel_for(ci.model, ctx.backend)
        p = np.repeat(np.array([[q.default] for q in ci.model.parameters]), cells, axis=1)
        y0 = np.repeat(cb.reference_state(ci, "ord_cipa_endo"), cells, axis=1)
        opts = cb.solver("rodas4:3e-4")
        prepace(k, p[:, :1], Protocol(2, cycle_length=1000.0), opts, y0=y0[:, :1])  # warm-up
        w, cpu = time.perf_counter(), time.process_time()
        pre = prepace(k, p, Protocol(beats, cycle_length=1000.0), opts, y0=y0, chunk=beats)
        w, cpu = time.perf_counter() - w, time.process_time() - cpu
        n = beats * cells
        ok = bool((pre.status == 0).all())
        thr = {"cpu": ctx.threads, "numpy": 1}.get(ctx.backend)
        label = f"twin {ctx.backend} ({thr} thread{'s' if thr != 1 else ''})" if thr else f"twin {ctx.backend}"
        rows = [row(c, label, n, w, cpu, ours=True, cpu_ms_per_cell_beat=1e3 * cpu / n, solver_ok=ok,
                    note=f"{cells} cells x {beats} beats; state drift from Myokit's steady state over the run "
                         f"{float(pre.rel_change[:, -1].max()):.1e} (relative, last beat)")]
        if "myokit" not in ctx.peers:
            rows.append(na_row(c, "Myokit CVODES", "skipped", "not asked for (--peers)"))
            return rows
        ver = peer_version("myokit")
        if ver is None:
            rows.append(na_row(c, "Myokit CVODES", "not installed"))
            return rows
        import myokit

        f, key, val, _ = cb.MODELS["ord_cipa_endo"]
        m, proto, _ = myokit.load(str(cb.DATA / f))
        m.get(key).set_rhs(val)
        sim = myokit.Simulation(m, proto)
        sim.set_tolerance(1e-6, 1e-4)
        ref = cb.json.loads((cb.DATA / "myokit_reference.json").read_text())["models"]["ord_cipa_endo"]
        sim.set_state([ref["state_after_999_beats"][v.qname()] for v in m.states()])
        mb = sz["myokit_beats"]
        w, cpu = time.perf_counter(), time.process_time()
        sim.pre(mb * 1000.0)
        w, cpu = time.perf_counter() - w, time.process_time() - cpu
        rows.append(row(c, f"Myokit CVODES {ver} (1 thread)", mb, w, cpu, cpu_ms_per_cell_beat=1e3 * cpu / mb,
                        ours_speedup=(n / rows[0]["wall_s"]) / (mb / w),
                        ours_speedup_per_cpu=(1e3 * cpu / mb) / (1e3 * rows[0]["cpu_s"] / n)))
        return rows

    c.run = run
    return c


# ---------------------------------------------------------------- ligand family
def _ligand_case() -> Case:
    c = Case("ligands", "docking", "redock biotin into streptavidin (1stp) from random starts, one CPU thread each",
             peers=("vina",))

    def run(ctx: Ctx) -> list[dict]:
        rd = redock()
        if rd is None or not (DOCK_DATA / "1stp_protein.pdbqt").is_file():
            return [na_row(c, "twin", "n/a", "benchmarks/docking_redock.py or tests/data/docking not in this installation")]
        exh = ctx.sizes["kernels"]["ligands"]["exhaustiveness"]
        lig = (DOCK_DATA / "1stp_ligand.pdbqt").read_text()
        centre, size = rd._extent_box(lig)
        cx = dict(name="1stp", rec=DOCK_DATA / "1stp_protein.pdbqt", lig=lig, center=tuple(centre), size=tuple(size))
        ours = rd.run_twin(cx, exh, 1)
        rows = [row(c, "twin cpu (1 thread)", 1, ours["wall_s"], ours["cpu_s"], ours=True,
                    note=f"exhaustiveness {exh}: score {ours['score']:.3f} kcal/mol, RMSD {ours['rmsd']:.2f} Å")]
        if "vina" not in ctx.peers:
            rows.append(na_row(c, "AutoDock Vina", "skipped", "not asked for (--peers)"))
            return rows
        ver = peer_version("vina")
        if ver is None:
            rows.append(na_row(c, "AutoDock Vina", "not installed"))
            return rows
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            v = rd.run_vina(cx, exh, 1, Path(work))
        rows.append(row(c, f"AutoDock Vina {ver} (1 thread)", 1, v["wall_s"], v["cpu_s"],
                        ours_speedup=v["cpu_s"] / ours["cpu_s"],
                        note=f"score {v['score']:.3f} kcal/mol, RMSD {v['rmsd']:.2f} Å"))
        return rows

    c.run = run
    return c


# ---------------------------------------------------------------- node-update family
def _tissue_case() -> Case:
    c = Case("node-updates", "monodomain", "Niederer 2011 slab, TP06 epi, dt 0.005 ms, full steps (cell + "
             "diffusion + tracking) from mid-stimulus", peers=())

    def run(ctx: Ctx) -> list[dict]:
        tp = tissue_perf()
        if tp is None or not NIEDERER_JOB.is_file():
            return [na_row(c, "twin", "n/a", "benchmarks/tissue_perf.py or jobs/ not in this installation")]
        from ..config import parse_job
        from ..tissue.setup import make_plan
        from ..tissue.solver import TissueSolver
        from kernels.tissue.build import tissue_kernels

        sz = ctx.sizes["kernels"]["tissue"]
        dx, steps, n_ref = sz["dx"], sz["steps"], sz["numpy_steps"]
        text = NIEDERER_JOB.read_text().replace("dx = 0.5", f"dx = {dx}").replace("dt = 0.05", "dt = 0.005")
        plan = make_plan(parse_job(text, str(NIEDERER_JOB), NIEDERER_JOB))
        m = plan.model
        xp = np
        if ctx.backend == "cuda":
            import cupy as xp  # noqa: F811 - the backend's array module
        vox = int(plan.geom.mask.sum())

        def solver(backend, tables):
            return TissueSolver(plan.geom, m, plan.params, tissue_kernels(m, backend, tables), plan.stimuli, 0.005,
                                xp=xp if backend == ctx.backend else np)

        s = solver(ctx.backend, True)
        for _ in range(sz["warmup"]):  # into the stimulus: realistic gates, every voxel doing work
            s.step()
        host = lambda a: a.get() if hasattr(a, "get") else np.asarray(a)  # noqa: E731
        Y0, Vp0, k0 = host(s.Y).copy(), host(s.Vprev).copy(), s.steps

        def timed(sv, n):
            sv.Y[...] = sv.xp.asarray(Y0)
            sv.Vprev[...] = sv.xp.asarray(Vp0)
            sv.steps, sv.t = k0, k0 * sv.dt
            w, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                sv.step()
            if sv.xp is not np:
                sv.xp.cuda.Device().synchronize()
            return time.perf_counter() - w, time.process_time() - cpu, host(sv.Y[sv.vidx]).copy()

        cnt = tp.counts(m, s.cross)
        nbytes = sum(cnt[k]["bytes"] for k in ("cell_tables", "diffuse", "track"))
        nflops = tp.table_flops(m) + cnt["diffuse"]["flops"] + cnt["track"]["flops"]
        nflops_exact = sum(cnt[k]["flops"] for k in ("cell", "diffuse", "track"))
        thr = {"cpu": ctx.threads, "numpy": 1}.get(ctx.backend)
        label = f"twin {ctx.backend}" + (f" ({thr} thread{'s' if thr != 1 else ''})" if thr else "")
        _, _, v_ours = timed(s, n_ref)
        w, cpu, _ = timed(s, steps)
        n = vox * steps
        rows = []

        def measured(lbl, n_, w_, cpu_, flops_, ours=False, **kw):
            g = flops_ * n_ / w_ / 1e9
            fr = fraction(g, flops_ / nbytes, ctx.floors, thr) if thr else {
                "floor": "not measured for this device", "fraction_of_floor": None}
            bw_floor = None
            if ctx.floors and thr:
                mem = ctx.floors["memory"]
                bw = mem["copy_gbs"] if thr > 1 else mem["copy_1t_gbs"]
                bw_floor = nbytes * n_ / (bw * 1e9)
            rows.append(row(c, lbl, n_, w_, cpu_, ours=ours, gflops=g, flops_per_node=flops_, bytes_per_node=nbytes,
                            arithmetic_intensity=flops_ / nbytes, ms_per_step=1e3 * w_ * vox / n_,
                            x_bandwidth_floor=(w_ / bw_floor) if bw_floor else None, **fr, **kw))

        measured(f"{label}, lookup tables", n, w, cpu, nflops, ours=True,
                 note=f"dx {dx} mm: {vox:,} voxels x {steps} steps")
        s_ex = solver(ctx.backend, False)
        w_ex, cpu_ex, v_ex = timed(s_ex, max(n_ref, steps // 4))
        n_ex = vox * max(n_ref, steps // 4)
        measured(f"{label}, exact formulas", n_ex, w_ex, cpu_ex, nflops_exact, ours_speedup=(n / w) / (n_ex / w_ex))
        s_np = solver("numpy", False)
        w_np, cpu_np, v_np = timed(s_np, n_ref)
        n_np = vox * n_ref
        _, _, v_ex_ref = timed(s_ex, n_ref)
        d = lambda a: float(np.max(np.abs(a - v_np)) / np.max(np.abs(v_np)))  # noqa: E731
        measured("twin numpy reference (1 thread, exact formulas)", n_np, w_np, cpu_np, nflops_exact,
                 ours_speedup=(n / w) / (n_np / w_np), max_rel_diff=d(v_ours),
                 note=f"{n_ref} steps; exact formulas vs numpy: max rel. diff of V {d(v_ex_ref):.1e}")
        return rows

    c.run = run
    return c



def ode_kernel_for(model, backend: str):
    from kernels.compile import ode_kernel

    return ode_kernel(model, backend)


def kernel_cases() -> list[Case]:
    return [
        _ode_case("lorenz", "Lorenz ensemble (rho spread), t∈[0,1], DOPRI5 rtol=atol=1e-8", "lorenz_case", "lorenz"),
        _ode_case("pk", "2-cmt oral PK, 14 doses q12h, 169 hourly samples, DOPRI5 rtol 1e-8", "pk_case", "pk"),
        _ode_case("uva", "UVA/Padova T1D 24 h, simglucose per-minute inputs, DOPRI5 rtol 1e-6", "uva_case", "uva"),
        _cell_case(),
        _tissue_case(),
        _ligand_case(),
    ]


def run_cases(cases: list[Case], ctx: Ctx) -> list[dict]:
    rows: list[dict] = []
    for c in cases:
        if c.run is None:
            rows.append(na_row(c, "twin", NOT_BUILT))
            for p in c.peers:
                v = peer_version(p)
                rows.append(na_row(c, p, NOT_BUILT,
                                   f"{p} {v} installed; runs here once the family exists" if v else f"{p} not installed"))
            continue
        t = time.perf_counter()
        ctx.log(f"kernels: {c.name}")
        try:
            rows += c.run(ctx)
        except Exception as e:  # noqa: BLE001 - one case failing keeps the others
            import traceback

            traceback.print_exc()
            rows.append(na_row(c, "twin", "error", f"{e.__class__.__name__}: {str(e)[:200]}"))
        ctx.log(f"kernels: {c.name} done in {time.perf_counter() - t:.1f} s")
    return rows
