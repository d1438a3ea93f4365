"""Monodomain tissue kernels for the three backends, built from one cell-model declaration.

- cpu:   the generated cell model (kernels/ode/codegen_c.py) + tissue.c, compiled with OpenMP and
         cached by source hash (kernels/compile.py), called through ctypes.
- cuda:  the same translation unit through CuPy's RawModule (one thread per voxel).
- numpy: a vectorised reference of the same three steps (cell, diffusion, tracking).

All three work on a rank's padded slab (see tissue.c): arrays Y[NS, n] (cell states, SoA), Vs, V2
(scratch potentials), mask[n] (uint8), stim_id[n] (int8, -1 = none), D*[n] (diffusivity tensor).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kernels.compile import build_shared_library, default_threads
from kernels.ode.codegen_c import HEADER, model_source
from kernels.ode.codegen_numpy import generate
from kernels.ode.model import Model

from .tables import TableCache, TablePlan, lut_simd_source, lut_step_source, membrane_state, plan_tables

TEMPLATE = Path(__file__).with_name("tissue.c")
SIMD_MATH = Path(__file__).with_name("simd_math.c")
# -fno-trapping-math: lets GCC turn the table step's branches into selects and vectorise it; it only
# drops floating-point trap semantics (never enabled here), values are unchanged. 512-bit vectors
# where the CPU has them (GCC 12 does not vectorise the loop's AVX-512 masks at 256 bits).
# -fno-tree-pre: partial-redundancy elimination stretches live ranges across the ~300-statement
# table loop and spills them to the stack; without it the table cell step is 15 % faster with the
# same bits (benchmarks/RESULTS.md, tissue section).
TISSUE_CFLAGS = ("-fno-trapping-math", "-mprefer-vector-width=512", "-fno-tree-pre")


def fused_step_source(model: Model) -> str:
    """`model_rl_step`: one Rush-Larsen / forward-Euler step of one cell, intermediates computed
    once (model_rhs and model_rl_b would each recompute them: the cell step is compute-bound)."""
    from kernels.ode.codegen_c import c_expr
    from kernels.ode.symbolic import gating

    st, pa, inp = model.state_names, model.parameter_names, model.input_names
    gates = gating(model)
    lines = ["DEVICE void model_rl_step(real t, const real* y, const real* p, const real* u, real h, real* yn) {"]
    lines += [f"    const real {n} = y[{i}];" for i, n in enumerate(st)]
    lines += [f"    const real {n} = p[{i}];" for i, n in enumerate(pa)]
    lines += [f"    const real {n} = u[{i}];" for i, n in enumerate(inp)]
    lines += [f"    const real {n} = {c_expr(e)};" for n, e in model.expressions]
    lines += ["    (void)t;"] + [f"    (void){n};" for n in st + pa + inp] + [f"    (void){n};" for n, _ in model.expressions]
    for i, n in enumerate(st):
        f = c_expr(model.derivatives[n])
        if n in gates:
            lines.append(f"    yn[{i}] = tissue_rl_update({n}, {f}, {c_expr(gates[n][1])}, h);")
        else:
            lines.append(f"    yn[{i}] = {n} + h * ({f});")
    lines.append("}")
    return "\n".join(lines) + "\n"


def table_plan(model: Model) -> TablePlan | None:
    v = membrane_state(model)
    return plan_tables(model, v) if v is not None else None


def tissue_source(model: Model) -> str:
    """One translation unit: real type, header macros, the cell model, the fused cell step (exact and
    lookup-table versions), the tissue kernels."""
    tpl = TEMPLATE.read_text()
    head, tail = tpl.split("/* @@FUSED_STEP@@ */")
    plan = table_plan(model)
    lut = lut_step_source(plan) if plan is not None else lut_step_source(TablePlan(model, "", [], {}))
    simd = "#ifndef KERNEL_CUDA\n" + SIMD_MATH.read_text() + lut_simd_source(plan) + "#endif\n"
    return ("#define TWIN_FLOAT32 0\n" + HEADER + model_source(model) + head + fused_step_source(model) + lut + simd
            + tail)


@dataclass
class TissueKernels:
    backend: str
    cell: Callable  # cell(mask, Y, Vs, p, stim_id, stim_amp, t, dt, vidx); lookup tables if built with them
    diffuse: Callable  # diffuse(shape, mask, V, Vout, D6, h3, dt, cross)
    track: Callable  # track(mask, V, Vprev, act_first, act_last, repol, apd, n_act, t0, dt, thr_act, thr_rep)
    source: str


_D = ctypes.POINTER(ctypes.c_double)
_U8 = ctypes.POINTER(ctypes.c_uint8)
_I8 = ctypes.POINTER(ctypes.c_int8)
_I32 = ctypes.POINTER(ctypes.c_int32)


def _p(a, t):
    return a.ctypes.data_as(t)


def _cpu(model: Model, tables: bool) -> TissueKernels:
    src = tissue_source(model)
    lib = ctypes.CDLL(str(build_shared_library(src, f"tissue_{model.name}", TISSUE_CFLAGS)))
    ll, i, r = ctypes.c_longlong, ctypes.c_int, ctypes.c_double
    lib.tissue_cell.argtypes = [ll, _U8, _D, _D, _D, _I8, _D, r, r, i, _D, r, r, i, i]
    lib.tissue_diffuse.argtypes = [i, i, i, _U8, _D, _D, _D, _D, _D, _D, _D, _D, r, r, r, r, i, i]
    lib.tissue_track.argtypes = [ll, _U8, _D, _D, _D, _D, _D, _D, _I32, r, r, r, r, i]
    for f in (lib.tissue_cell, lib.tissue_diffuse, lib.tissue_track):
        f.restype = None
    th = default_threads()
    cache = TableCache(table_plan(model) if tables else None)

    def cell(mask, Y, Vs, p, stim_id, stim_amp, t, dt, vidx):
        tab = cache.get(p, dt)
        lut, v0, idv = tab if tab is not None else (None, 0.0, 0.0)
        lib.tissue_cell(mask.size, _p(mask, _U8), _p(Y, _D), _p(Vs, _D), _p(p, _D), _p(stim_id, _I8),
                        _p(stim_amp, _D), t, dt, vidx, None if lut is None else _p(lut, _D), v0, idv,
                        0 if lut is None else lut.shape[0], th)

    def diffuse(shape, mask, V, Vout, D6, h3, dt, cross):
        lib.tissue_diffuse(*shape, _p(mask, _U8), _p(V, _D), _p(Vout, _D), *[_p(d, _D) for d in D6], *h3, dt,
                           int(cross), th)

    def track(mask, V, Vprev, a1, a2, rep, apd, nact, t0, dt, thr_a, thr_r):
        lib.tissue_track(mask.size, _p(mask, _U8), _p(V, _D), _p(Vprev, _D), _p(a1, _D), _p(a2, _D), _p(rep, _D),
                         _p(apd, _D), _p(nact, _I32), t0, dt, thr_a, thr_r, th)

    return TissueKernels("cpu", cell, diffuse, track, src)


def _cuda(model: Model, tables: bool) -> TissueKernels:  # pragma: no cover - needs a GPU
    import cupy as cp

    src = tissue_source(model)
    cache = TableCache(table_plan(model) if tables else None)
    dev: dict = {}
    mod = cp.RawModule(code=src, options=("--std=c++14",))
    fc, fd, ft = (mod.get_function(n) for n in ("tissue_cell", "tissue_diffuse", "tissue_track"))
    T = 128

    def g(n):
        return ((n + T - 1) // T,)

    def cell(mask, Y, Vs, p, stim_id, stim_amp, t, dt, vidx):
        if dev.get("p") is not p or dev.get("dt") != dt:  # a device->host copy only when p or dt change
            dev["tab"], dev["p"], dev["dt"] = cache.get(cp.asnumpy(p), dt), p, dt
        tab = dev["tab"]
        if tab is not None and dev.get("key") is not cache.key:
            dev["lut"], dev["key"] = cp.asarray(tab[0]), cache.key
        lut = dev["lut"] if tab is not None else cp.zeros(1)
        v0, idv, rows = (tab[1], tab[2], tab[0].shape[0]) if tab is not None else (0.0, 0.0, 0)
        fc(g(mask.size), (T,), (np.int64(mask.size), mask, Y, Vs, p, stim_id, stim_amp, np.float64(t),
                                np.float64(dt), np.int32(vidx), lut, np.float64(v0), np.float64(idv),
                                np.int32(rows)))

    def diffuse(shape, mask, V, Vout, D6, h3, dt, cross):
        fd(g(mask.size), (T,), (*[np.int32(s) for s in shape], mask, V, Vout, *D6, *[np.float64(h) for h in h3],
                                np.float64(dt), np.int32(cross)))

    def track(mask, V, Vprev, a1, a2, rep, apd, nact, t0, dt, thr_a, thr_r):
        ft(g(mask.size), (T,), (np.int64(mask.size), mask, V, Vprev, a1, a2, rep, apd, nact, np.float64(t0),
                                np.float64(dt), np.float64(thr_a), np.float64(thr_r)))

    return TissueKernels("cuda", cell, diffuse, track, src)


# ------------------------------------------------------------------------------ numpy reference
def numpy_laplacian(shape, mask: np.ndarray, V: np.ndarray, D6, h3, cross: bool) -> np.ndarray:
    """div(D grad V) on the padded grid, same discretisation as tissue.c (0 off the tissue/ghosts)."""
    nx, ny, nz = shape
    m = mask.reshape(shape).astype(bool)
    v = V.reshape(shape)
    D = [d.reshape(shape) for d in D6]  # xx yy zz xy xz yz
    Dt = [[D[0], D[3], D[4]], [D[3], D[1], D[5]], [D[4], D[5], D[2]]]
    inner = (slice(1, -1),) * 3

    def sh(a, off):  # a shifted so that out[c] = a[c + off] on the interior
        return a[tuple(slice(1 + o, a.shape[d] - 1 + o) for d, o in enumerate(off))]

    def unit(a, s):
        o = [0, 0, 0]
        o[a] = s
        return o

    mi, vc = m[inner], v[inner]
    lap = np.zeros_like(vc)
    for a in range(3):
        F = {}
        ins = {s: sh(m, unit(a, s)) for s in (-1, 1)}
        for s in (-1, 1):
            nbv = sh(v, unit(a, s))
            f = 0.5 * (Dt[a][a][inner] + sh(Dt[a][a], unit(a, s))) * ((nbv - vc) if s > 0 else (vc - nbv)) / h3[a]
            if cross:
                for b in range(3):
                    if b == a:
                        continue
                    g = 0.0
                    for q in (0, 1):
                        base = unit(a, s) if q else [0, 0, 0]
                        pp = [base[d] + unit(b, 1)[d] for d in range(3)]
                        pm = [base[d] + unit(b, -1)[d] for d in range(3)]
                        mp, mm = sh(m, pp), sh(m, pm)
                        vp0, vm0, vcc = sh(v, pp), sh(v, pm), sh(v, base)
                        vp = np.where(mp, vp0, np.where(mm, vm0, vcc))
                        vm = np.where(mm, vm0, np.where(mp, vp0, vcc))
                        g = g + (vp - vm) / (4 * h3[b])
                    f = f + 0.5 * (Dt[a][b][inner] + sh(Dt[a][b], unit(a, s))) * g
            F[s] = np.where(ins[s], f, 0.0)
        Fm = np.where(ins[1] & ~ins[-1], -F[1], F[-1])
        Fp = np.where(ins[-1] & ~ins[1], -F[-1], F[1])
        lap += (Fp - Fm) / h3[a]
    out = np.zeros(shape)
    out[inner] = np.where(mi, lap, 0.0)
    return out.reshape(-1)


def _numpy(model: Model, tables: bool) -> TissueKernels:  # noqa: ARG001 - the reference is always exact
    gen = generate(model)
    n_in = max(len(model.inputs), 1)

    def cell(mask, Y, Vs, p, stim_id, stim_amp, t, dt, vidx):
        on = np.flatnonzero(mask)
        Vs[:] = Y[vidx]
        y = Y[:, on]
        u = np.zeros((n_in, on.size))
        sid = stim_id[on]
        u[0] = np.where(sid >= 0, stim_amp[np.maximum(sid, 0)] if stim_amp.size else 0.0, 0.0)
        P = np.broadcast_to(p[:, None], (p.size, on.size))
        f = gen.rhs(t, y, P, u)
        z = gen.rl_b(t, y, P, u) * dt
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            phi = np.where(np.abs(z) < 1e-8, 1.0 + 0.5 * z, np.expm1(z) / z)
        yn = y + dt * (f * phi)
        for i in range(Y.shape[0]):
            if i == vidx:
                Vs[on] = yn[i]
            else:
                Y[i, on] = yn[i]

    def diffuse(shape, mask, V, Vout, D6, h3, dt, cross):
        Vout[:] = V + dt * numpy_laplacian(shape, mask, V, D6, h3, cross)

    def track(mask, V, Vprev, a1, a2, rep, apd, nact, t0, dt, thr_a, thr_r):
        on = mask.astype(bool)
        v0, v1 = Vprev, V
        up = on & (v0 < thr_a) & (v1 >= thr_a)
        with np.errstate(invalid="ignore", divide="ignore"):
            tu = t0 + dt * (thr_a - v0) / (v1 - v0)
            first = up & np.isnan(a1)
            a1[first] = tu[first]
            a2[up] = tu[up]
            nact[up] += 1
            down = on & (v0 >= thr_r) & (v1 < thr_r) & ~np.isnan(a2)
            td = t0 + dt * (v0 - thr_r) / (v0 - v1)
            new = down & ~(rep >= a2)
        rep[new] = td[new]
        apd[new] = td[new] - a2[new]
        Vprev[on] = V[on]

    return TissueKernels("numpy", cell, diffuse, track, gen.source)


_CACHE: dict[tuple, TissueKernels] = {}


def tissue_kernels(model: Model, backend: str, tables: bool = False) -> TissueKernels:
    """Kernels for `backend`; `tables`: the cell step reads membrane-potential lookup tables
    (kernels/tissue/tables.py) on cpu and cuda; the numpy reference always uses exact formulas."""
    key = (id(model), backend, bool(tables))
    if key not in _CACHE:
        _CACHE[key] = {"numpy": _numpy, "cpu": _cpu, "cuda": _cuda}[backend](model, bool(tables))
    return _CACHE[key]
