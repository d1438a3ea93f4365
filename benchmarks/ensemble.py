"""Ensemble benchmarks: twin-engine kernels vs a SciPy `solve_ivp` loop vs Diffrax (JAX, vmap).

    .venv/bin/python benchmarks/ensemble.py            # full sizes, writes benchmarks/ensemble.json
    .venv/bin/python benchmarks/ensemble.py --quick    # small sizes, a smoke run

Cases (same model declaration, same method family, same tolerances for every peer):
  lorenz   10^4 members, rho spread, t in [0, 1], 11 saved points, DOPRI5 rtol = atol = 1e-8
  uva      UVA/Padova T1D, simglucose's 24 h per-minute inputs replayed (30 patients; the 10^4
           version repeats them), Gsub every 5 min, DOPRI5 rtol 1e-6 / atol 1e-9
  pk       two-compartment oral PK, 100 mg q12h x 14, hourly samples for 7 days, 10^5 patients,
           DOPRI5 rtol 1e-8 / atol 1e-9
CPU time is process time (all threads). Peers that are too slow for the full size run a subset;
patients/s and CPU-ms per patient-day are what is compared. Before timing, each peer's answer is
checked against ours. JAX compile time is excluded (a warm-up run first); our C compile is cached.
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
import pandas as pd
from scipy.integrate import solve_ivp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import Arm, Dose  # noqa: E402
from engine.dosing import build_events, schedule_events  # noqa: E402
from engine.models import get_model  # noqa: E402
from kernels.compile import default_threads, ode_kernel  # noqa: E402
from kernels.ode.codegen_numpy import generate, to_numpy_expr  # noqa: E402
from kernels.ode.integrate_numpy import Events, SolverOptions  # noqa: E402

GLU = ROOT / "tests" / "data" / "glucose"


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


# ---------------------------------------------------------------- cases
def lorenz_case(n):
    m = get_model("lorenz")
    rng = np.random.default_rng(0)
    P = np.array([[p.default for p in m.parameters]] * n, float).T
    P[m.parameter_names.index("rho")] = rng.uniform(20, 35, n)
    return dict(model=m, P=P, events=Events.empty(n), times=np.linspace(0, 1, 11), rtol=1e-8, atol=1e-8,
                record=["X"], days_per_patient=None, segments=[(0.0, 1.0)])


def uva_params_and_inputs():
    m = get_model("uva_padova_t1d")
    tr = pd.read_csv(GLU / "simglucose_trace_24h_1min.csv.gz")
    pp = pd.read_csv(GLU / "vpatient_params.csv")
    pats = list(dict.fromkeys(tr.patient))
    P = np.empty((len(m.parameters), len(pats)))
    for j, name in enumerate(pats):
        row = pp[pp.Name == name].iloc[0]
        for i, p in enumerate(m.parameters):
            col = p.name if p.name in row else "x0_ " + p.name[3:] if p.name.startswith("x0_") else None
            P[i, j] = float(row[col]) if col in row else p.default
    vals = {inp: np.stack([tr[tr.patient == n][col].to_numpy()[:1440] for n in pats], axis=1)
            for col, inp in [("CHO_g_per_min", "CHO"), ("insulin_U_per_min", "insulin"),
                             ("last_Qsto_mg", "last_Qsto"), ("last_foodtaken_g", "last_foodtaken")]}
    return m, P, vals


def uva_case(n):
    m, P30, vals30 = uva_params_and_inputs()
    idx = np.arange(n) % P30.shape[1]
    P = P30[:, idx]
    vals = {k: v[:, idx] for k, v in vals30.items()}
    events = schedule_events(m, np.arange(1440.0), vals)
    return dict(model=m, P=P, events=events, times=np.arange(0, 1441, 5.0), rtol=1e-6, atol=1e-9, record=["Gsub"],
                days_per_patient=1.0, inputs=vals)


def pk_case(n):
    m = get_model("pk_2cmt")
    rng = np.random.default_rng(1)
    P = np.array([[p.default for p in m.parameters]] * n, float).T
    for k, w in (("CL", 0.3), ("V1", 0.2), ("Q", 0.25), ("V2", 0.2), ("ka", 0.4)):
        P[m.parameter_names.index(k)] *= np.exp(w * rng.standard_normal(n))
    arms = [Arm(name="a", doses=[Dose(amount=100.0, route="oral", interval=12.0, count=14)])]
    events = build_events(m, arms, np.zeros(n, np.int16), P)
    return dict(model=m, P=P, events=events, times=np.arange(0, 169, 1.0), rtol=1e-8, atol=1e-9, record=["C"],
                days_per_patient=7.0)


# ---------------------------------------------------------------- ours
def run_ours(case, backend):
    k = ode_kernel(case["model"], backend)
    opts = SolverOptions(rtol=case["rtol"], atol=case["atol"], max_steps=10_000_000)
    st = np.zeros(case["P"].shape[1], np.int8)
    (out, status), wall, cpu = timed(lambda: k.run(case["P"], case["events"], case["times"], opts, case["record"], st))
    assert (status == 0).all(), np.bincount(status)
    return out[0], wall, cpu


# ---------------------------------------------------------------- SciPy solve_ivp loop
def run_scipy(case, n):
    m = case["model"]
    gen = generate(m)
    ev = case["events"]
    times = case["times"]
    out = np.empty((n, len(times)))

    def one(i):
        p = case["P"][:, i:i + 1]
        y = gen.init(p)[:, 0].copy()
        u = np.zeros((max(len(m.inputs), 1), 1))
        et = ev.time[:, i] if ev.time.size else np.zeros(0)
        stops = sorted(set(float(x) for x in et if np.isfinite(x)) | {float(times[-1])})
        t0, e = 0.0, 0
        for t1 in [0.0, *stops]:
            if t1 > t0:
                sel = (times > t0) & (times <= t1)
                f = lambda t, yy: gen.rhs(t, yy[:, None], p, u)[:, 0]  # noqa: E731
                sol = solve_ivp(f, (t0, t1), y, method="RK45", rtol=case["rtol"], atol=case["atol"],
                                t_eval=times[sel])
                if sel.any():
                    rec = np.array(gen.outputs(sol.t, sol.y, np.repeat(p, len(sol.t), 1), np.repeat(u, len(sol.t), 1)))
                    name = case["record"][0]
                    out[i, sel] = rec[m.output_names.index(name)] if name in m.output_names else sol.y[m.state_names.index(name)]
                y = solve_ivp(lambda t, yy: gen.rhs(t, yy[:, None], p, u)[:, 0], (t0, t1), y, method="RK45",
                              rtol=case["rtol"], atol=case["atol"]).y[:, -1].copy() if not sel.any() or sol.t[-1] != t1 else sol.y[:, -1].copy()
                t0 = t1
            while e < len(et) and et[e] <= t1:
                (y if ev.kind[e, i] == 0 else u[:, 0])[ev.target[e, i]] += ev.value[e, i]
                e += 1
            if t1 == 0.0 and 0.0 in times:
                rec = np.array(gen.outputs(np.zeros(1), y[:, None], p, u))
                name = case["record"][0]
                out[i, 0] = rec[m.output_names.index(name), 0] if name in m.output_names else y[m.state_names.index(name)]

    _, wall, cpu = timed(lambda: [one(i) for i in range(n)])
    return out, wall, cpu


# ---------------------------------------------------------------- Diffrax (JAX, vmap)
def jax_rhs(model):
    import jax.numpy as jnp

    st, pa, inp = model.state_names, model.parameter_names, model.input_names
    lines = ["def rhs(t, y, args):", "    p, u = args"]
    lines += [f"    {n} = y[{i}]" for i, n in enumerate(st)]
    lines += [f"    {n} = p[{i}]" for i, n in enumerate(pa)]
    lines += [f"    {n} = u[{i}]" for i, n in enumerate(inp)]
    lines += [f"    {n} = {to_numpy_expr(e).replace('np.', 'jnp.')}" for n, e in model.expressions]
    lines += ["    return jnp.stack([" + ", ".join(
        f"jnp.asarray({to_numpy_expr(model.derivatives[n]).replace('np.', 'jnp.')}, dtype=y.dtype)" for n in st) + "])"]
    lines += ["def out(t, y, p, u):"] + [f"    {n} = y[{i}]" for i, n in enumerate(st)]
    lines += [f"    {n} = p[{i}]" for i, n in enumerate(pa)] + [f"    {n} = u[{i}]" for i, n in enumerate(inp)]
    lines += [f"    {n} = {to_numpy_expr(e).replace('np.', 'jnp.')}" for n, e in model.expressions]
    lines += ["    return {" + ", ".join(f"{o.name!r}: {to_numpy_expr(o.expr).replace('np.', 'jnp.')}" for o in model.outputs) + "}"]
    ns = {"jnp": jnp}
    exec("\n".join(lines), ns)
    return ns["rhs"], ns["out"]


def run_diffrax(case, n):
    import diffrax as dfx
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    m = case["model"]
    rhs, outf = jax_rhs(m)
    term = dfx.ODETerm(rhs)
    solver = dfx.Dopri5()
    ctrl = dfx.PIDController(rtol=case["rtol"], atol=case["atol"])
    name = case["record"][0]
    P = jnp.asarray(case["P"][:, :n].T)
    y0 = jnp.asarray(generate(m).init(case["P"][:, :n]).T)
    times = case["times"]
    n_in = max(len(m.inputs), 1)

    def record(t, y, p, u):
        if name in m.output_names:
            return outf(t, y, p, u)[name]
        return y[m.state_names.index(name)]

    if m.name == "lorenz":
        def one(p, y0):
            sol = dfx.diffeqsolve(term, solver, 0.0, 1.0, None, y0, args=(p, jnp.zeros(n_in)), stepsize_controller=ctrl,
                                  saveat=dfx.SaveAt(ts=jnp.asarray(times)), max_steps=1_000_000)
            return sol.ys[:, m.state_names.index(name)]
        fn = jax.jit(jax.vmap(one))
        args = (P, y0)
    elif m.name == "pk_2cmt":
        F = P[:, m.parameter_names.index("F")]
        per = 12
        def one(p, y0, f):
            def seg(y, k):
                y = y.at[0].add(f * 100.0)
                ts = 12.0 * k + jnp.arange(per, dtype=jnp.float64)
                sol = dfx.diffeqsolve(term, solver, 12.0 * k, 12.0 * k + 12.0, None, y, args=(p, jnp.zeros(n_in)),
                                      stepsize_controller=ctrl, saveat=dfx.SaveAt(ts=ts, t1=True), max_steps=100_000)
                c = jax.vmap(lambda yy: record(0.0, yy, p, jnp.zeros(n_in)))(sol.ys[:per])
                return sol.ys[-1], c
            yl, cs = jax.lax.scan(seg, y0, jnp.arange(14))
            last = record(0.0, yl, p, jnp.zeros(n_in))
            return jnp.concatenate([cs.reshape(-1), last[None]])
        fn = jax.jit(jax.vmap(one))
        args = (P, y0, F)
    else:  # uva: per-minute inputs, restarted each minute (as simglucose does)
        U = jnp.asarray(np.stack([case["inputs"][k][:, :n] for k in m.input_names], axis=-1).transpose(1, 0, 2))
        def one(p, y0, u):
            def seg(y, k):
                sol = dfx.diffeqsolve(term, solver, 1.0 * k, 1.0 * k + 1.0, None, y, args=(p, u[k]),
                                      stepsize_controller=ctrl, saveat=dfx.SaveAt(t1=True), max_steps=100_000)
                y1 = sol.ys[-1]
                return y1, record(0.0, y1, p, u[k])
            _, g = jax.lax.scan(seg, y0, jnp.arange(1440))
            g0 = record(0.0, y0, p, u[0])
            return jnp.concatenate([g0[None], g])[::5]
        fn = jax.jit(jax.vmap(one))
        args = (P, y0, U)
    jax.block_until_ready(fn(*args))  # compile + warm-up
    out, wall, cpu = timed(lambda: jax.block_until_ready(fn(*args)))
    return np.asarray(out), wall, cpu


# ---------------------------------------------------------------- torchdiffeq (batched odeint)
class _TorchNP:
    """The few NumPy names generated expressions use, on torch tensors."""

    def __init__(self, torch):
        self.t = torch
        self.pi = float(np.pi)
        for n in ("exp", "log", "sqrt", "abs", "tanh", "sin", "cos"):
            setattr(self, n, getattr(torch, n))

    def _pair(self, a, b):
        ref = a if self.t.is_tensor(a) else b
        cv = lambda x: x if self.t.is_tensor(x) else self.t.as_tensor(x, dtype=ref.dtype, device=ref.device)  # noqa: E731
        return cv(a), cv(b)

    def maximum(self, a, b):
        return self.t.maximum(*self._pair(a, b))

    def minimum(self, a, b):
        return self.t.minimum(*self._pair(a, b))

    def power(self, a, b):
        return self.t.pow(a, b)

    def where(self, c, a, b):
        return self.t.where(c, *self._pair(a, b))


def torch_rhs(model, torch):
    st, pa, inp = model.state_names, model.parameter_names, model.input_names
    lines = ["def rhs(t, y, p, u):"] + [f"    {n} = y[:, {i}]" for i, n in enumerate(st)]
    lines += [f"    {n} = p[:, {i}]" for i, n in enumerate(pa)] + [f"    {n} = u[:, {i}]" for i, n in enumerate(inp)]
    lines += [f"    {n} = {to_numpy_expr(e)}" for n, e in model.expressions]
    lines += ["    z = 0 * y[:, 0]", "    return torch.stack([" + ", ".join(
        f"z + ({to_numpy_expr(model.derivatives[n])})" for n in st) + "], dim=1)"]
    lines += ["def out(t, y, p, u):"] + [f"    {n} = y[:, {i}]" for i, n in enumerate(st)]
    lines += [f"    {n} = p[:, {i}]" for i, n in enumerate(pa)] + [f"    {n} = u[:, {i}]" for i, n in enumerate(inp)]
    lines += [f"    {n} = {to_numpy_expr(e)}" for n, e in model.expressions]
    lines += ["    return {" + ", ".join(f"{o.name!r}: {to_numpy_expr(o.expr)}" for o in model.outputs) + "}"]
    ns = {"np": _TorchNP(torch), "torch": torch}
    exec("\n".join(lines), ns)
    return ns["rhs"], ns["out"]


def run_torchdiffeq(case, n, device):
    """torchdiffeq's usual batched use: the whole ensemble is one system with one step size."""
    import torch
    from torchdiffeq import odeint

    m = case["model"]
    rhs, outf = torch_rhs(m, torch)
    dev = torch.device(device)
    P = torch.as_tensor(case["P"][:, :n].T.copy(), dtype=torch.float64, device=dev)
    y = torch.as_tensor(generate(m).init(case["P"][:, :n]).T.copy(), dtype=torch.float64, device=dev)
    n_in = max(len(m.inputs), 1)
    name = case["record"][0]
    times = case["times"]
    kw = dict(method="dopri5", rtol=case["rtol"], atol=case["atol"])

    def rec(yy, u):
        return outf(0.0, yy, P, u)[name] if name in m.output_names else yy[:, m.state_names.index(name)]

    def go():
        yy = y.clone()
        res = []
        if m.name == "lorenz":
            u = torch.zeros((n, n_in), dtype=torch.float64, device=dev)
            sol = odeint(lambda t, z: rhs(t, z, P, u), yy, torch.as_tensor(times, device=dev), **kw)
            res = [rec(s, u) for s in sol]
        elif m.name == "pk_2cmt":
            u = torch.zeros((n, n_in), dtype=torch.float64, device=dev)
            F = P[:, m.parameter_names.index("F")]
            for kk in range(14):
                yy[:, 0] += F * 100.0
                ts = torch.arange(12.0 * kk, 12.0 * kk + 12.0 + 0.5, 1.0, dtype=torch.float64, device=dev)
                sol = odeint(lambda t, z: rhs(t, z, P, u), yy, ts, **kw)
                res += [rec(s, u) for s in sol[:-1]]
                yy = sol[-1]
            res.append(rec(yy, u))
        else:
            U = torch.as_tensor(np.stack([case["inputs"][k][:, :n] for k in m.input_names], axis=-1),
                                dtype=torch.float64, device=dev)
            res.append(rec(yy, U[0]))
            for kk in range(1440):
                ts = torch.tensor([kk, kk + 1.0], dtype=torch.float64, device=dev)
                yy = odeint(lambda t, z: rhs(t, z, P, U[kk]), yy, ts, **kw)[-1]
                res.append(rec(yy, U[kk]))
            res = res[::5]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return torch.stack(res, dim=1).cpu().numpy()

    out, wall, cpu = timed(go)
    return out, wall, cpu


# ---------------------------------------------------------------- driver
def row(case_name, peer, n, wall, cpu, days):
    r = {"case": case_name, "peer": peer, "patients": n, "wall_s": wall, "cpu_s": cpu, "patients_per_s": n / wall}
    if days:
        r["cpu_ms_per_patient_day"] = 1e3 * cpu / (n * days)
    return r


def agree(a, b, what):
    big = np.abs(a) > 1e-3 * np.nanmax(np.abs(a))
    d = float(np.nanmax(np.abs(a[big] - b[big]) / np.abs(a[big])))
    print(f"  {what}: max relative difference vs ours {d:.2e}", flush=True)
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-diffrax", action="store_true")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "cuda"], help="our compiled backend to time")
    ap.add_argument("--torchdiffeq", action="store_true", help="also time torchdiffeq (on the GPU with --backend cuda)")
    ap.add_argument("--only", nargs="*", help="cases to run (lorenz uva30 uva pk)")
    ap.add_argument("-o", default=str(Path(__file__).with_name("ensemble.json")))
    a = ap.parse_args()
    big = {"lorenz": 10_000, "uva30": 30, "uva": 10_000, "pk": 100_000}
    sub = {"lorenz": 200, "uva30": 3, "uva": 3, "pk": 100}
    dfx_n = {"lorenz": 10_000, "uva30": 30, "uva": 1_000, "pk": 10_000}
    if a.quick:
        big = {"lorenz": 1000, "uva30": 30, "uva": 300, "pk": 2000}
        sub = {k: min(v, 20) for k, v in sub.items()}
        dfx_n = {k: min(v, 300) for k, v in dfx_n.items()}
    makers = {"lorenz": lorenz_case, "uva30": uva_case, "uva": uva_case, "pk": pk_case}
    if a.only:
        makers = {k: v for k, v in makers.items() if k in a.only}
    if a.backend == "cuda":  # a GPU holds far more than the CPU sizes
        big = {k: v * (10 if k != "uva30" else 1) for k, v in big.items()}
        dfx_n = {k: big[k] if k != "uva" else min(big[k], 10_000) for k in dfx_n}
    rows = []
    for name, mk in makers.items():
        case = mk(big[name])
        print(f"{name}: {big[name]} patients", flush=True)
        days = case["days_per_patient"]
        ours, w, c = run_ours(case, a.backend)
        if a.backend == "cuda":
            run_ours(case, "cuda")  # the first call includes NVRTC compilation; time a second one
            ours, w, c = run_ours(case, "cuda")
            import cupy as cp

            dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
            label = f"twin cuda ({dev.decode() if isinstance(dev, bytes) else dev})"
        else:
            label = f"twin cpu ({default_threads()} threads)"
        rows.append(row(name, label, big[name], w, c, days))
        ours_np, w, c = run_ours({**case, "P": case["P"][:, :sub[name] * 10], "events": _cut(case["events"], sub[name] * 10)}, "numpy")
        rows.append(row(name, "twin numpy", sub[name] * 10, w, c, days))
        k = sub[name]
        sp, w, c = run_scipy(case, k)
        agree(ours[:k], sp, "scipy")
        rows.append(row(name, "scipy solve_ivp loop (RK45)", k, w, c, days))
        if not a.no_diffrax:
            k = dfx_n[name]
            dx, w, c = run_diffrax(case, k)
            agree(ours[:k], dx, "diffrax")
            rows.append(row(name, "diffrax Dopri5 (jax vmap, CPU)", k, w, c, days))
        if a.torchdiffeq:
            k = dfx_n[name]
            td, w, c = run_torchdiffeq(case, k, "cuda" if a.backend == "cuda" else "cpu")
            agree(ours[:k], td, "torchdiffeq")
            rows.append(row(name, f"torchdiffeq dopri5 (batched, {'GPU' if a.backend == 'cuda' else 'CPU'})", k, w, c, days))
        for r in rows[-5:]:
            print("  ", {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in r.items()}, flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "quick": a.quick}
    try:
        import diffrax
        import jax

        meta.update(jax=jax.__version__, diffrax=diffrax.__version__)
    except ImportError:
        pass
    Path(a.o).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(markdown(rows))


def _cut(ev: Events, n: int) -> Events:
    return Events(ev.time[:, :n], ev.kind[:, :n], ev.target[:, :n], ev.value[:, :n])


def markdown(rows) -> str:
    out = ["| case | peer | patients | wall s | patients/s | CPU-ms / patient-day |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        d = r.get("cpu_ms_per_patient_day")
        out.append(f"| {r['case']} | {r['peer']} | {r['patients']:,} | {r['wall_s']:.3f} | {r['patients_per_s']:,.0f} | "
                   f"{'' if d is None else f'{d:,.2f}'} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
