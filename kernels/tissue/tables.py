"""Membrane-potential lookup tables for the tissue cell step.

The standard speed-up of cardiac tissue codes (Chaste's generated lookup tables, openCARP's LUTs):
every subexpression of the cell model that depends on the membrane potential V alone (with the
run's parameters, which are uniform over the tissue) and costs a transcendental call is evaluated
once per run on a fine V grid and read by linear interpolation. Gating states whose Rush-Larsen
coefficients are V-only are updated as y' = E(V) y + G(V) with

    E = exp(b dt),  G = a dt phi(b dt),  phi(z) = expm1(z)/z     (f = a + b y, a and b frozen),

which is the same update tissue_rl_update computes, so at a grid node the tabulated step equals
the exact one to round-off. Between nodes the error is the linear-interpolation error,
|f''| dv^2 / 8 (dv = 0.01 mV: ~2e-6 relative for TP06's steepest rate, exp(0.35 V)).

A V outside the table (or NaN) takes the exact formulas: the tables change speed, never the range
of states the step accepts. The NumPy reference backend always uses the exact formulas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernels.ode.codegen_c import c_expr
from kernels.ode.codegen_numpy import to_numpy_expr
from kernels.ode.model import Model
from kernels.ode.symbolic import _names, _parse, _str, gating

V_LO, V_HI, DV = -150.0, 150.0, 0.01  # mV; TP06/ORd stay within about -95..+50 mV outside stimuli
_COSTLY = {"exp", "log", "sqrt", "tanh", "sin", "cos"}
_SMALL_POW = (2.0, 3.0, 4.0)
PREFIX = "_twin_lut_"


@dataclass
class TablePlan:
    """What to tabulate for one model, and the rewritten step that reads it.

    order: column layout, ("expr", tree) for a V-only subexpression (over V, parameters and V-only
    intermediates) or ("E" | "G", gate) for a gate's Rush-Larsen coefficients.
    body: the intermediates still computed per voxel, V-only costly subtrees replaced by columns.
    updates: per state ("lut", E col, G col) | ("rl", f, b) | ("euler", f), trees."""

    model: Model
    vname: str
    vonly: list[tuple[str, str]]  # V-only intermediates in model order (name, expr): table inputs
    gates: dict[str, tuple[str, str]]  # tabulated gate -> (a, b) expressions
    order: list[tuple[str, object]] = field(default_factory=list)
    body: list[tuple[str, tuple]] = field(default_factory=list)
    updates: list[tuple] = field(default_factory=list)

    @property
    def n_columns(self) -> int:
        return len(self.order)


def _costly(n: tuple, costly_names: set) -> bool:
    k = n[0]
    if k == "name":
        return n[1] in costly_names
    if k == "num":
        return False
    if k == "call":
        return n[1] in _COSTLY or any(_costly(a, costly_names) for a in n[2])
    if k == "pow":
        small = n[2][0] == "num" and n[2][1] in _SMALL_POW
        return (not small) or _costly(n[1], costly_names)
    if k == "neg":
        return _costly(n[1], costly_names)
    if k == "ifelse":
        _, _, l, r = n[1]
        return any(_costly(x, costly_names) for x in (l, r, n[2], n[3]))
    return _costly(n[1], costly_names) or _costly(n[2], costly_names)


def _map(n: tuple, f) -> tuple:
    """`n` with `f` applied to each direct sub-expression (names and numbers unchanged)."""
    k = n[0]
    if k in ("name", "num"):
        return n
    if k == "neg":
        return ("neg", f(n[1]))
    if k == "call":
        return ("call", n[1], tuple(f(a) for a in n[2]))
    if k == "ifelse":
        _, op, l, r = n[1]
        return ("ifelse", ("cmp", op, f(l), f(r)), f(n[2]), f(n[3]))
    return (k, f(n[1]), f(n[2]))


def _expand_pow(n: tuple) -> tuple:
    """x**2, x**3, x**4 as products: C's pow() is a library call for exponents other than 2."""
    n = _map(n, _expand_pow)
    if n[0] == "pow" and n[2][0] == "num" and n[2][1] in _SMALL_POW:
        out = n[1]
        for _ in range(int(n[2][1]) - 1):
            out = ("mul", out, n[1])
        return out
    return n


class _Rewriter:
    """Replaces maximal V-only costly subtrees by table columns, adding each distinct one once."""

    def __init__(self, plan: TablePlan, known: set, costly: set):
        self.plan, self.known, self.costly, self.index = plan, known, costly, {}

    def column(self, n: tuple) -> tuple:
        key = _str(n)
        if key not in self.index:
            self.index[key] = len(self.plan.order)
            self.plan.order.append(("expr", n))
        return ("name", f"{PREFIX}{self.index[key]}")

    def _vonly(self, n: tuple) -> bool:
        return _names(n) <= self.known and _costly(n, self.costly)

    def __call__(self, n: tuple) -> tuple:
        if n[0] == "num":
            return n
        if self._vonly(n):
            return self.column(n)
        # (1/b is not tabulated for a V-only denominator b: b may cross zero inside the table, e.g.
        # exp(2(V-15)F/RT) - 1 of the L-type current, and a pole does not interpolate linearly)
        return _map(n, self)


def plan_tables(model: Model, vname: str) -> TablePlan:
    """Tabulable gates and V-only costly subexpressions of `model` (`vname`: the membrane-potential
    state), and the per-voxel step rewritten to read them."""
    known = {vname} | set(model.parameter_names)
    vonly, costly = [], set()
    for n, e in model.expressions:
        t = _parse(e)
        if _names(t) <= known:
            known.add(n)
            vonly.append((n, e))
            if _costly(t, costly):
                costly.add(n)
    all_gates = gating(model)
    gates = {x: ab for x, ab in all_gates.items()
             if x != vname and (_names(_parse(ab[0])) | _names(_parse(ab[1]))) <= known}
    plan = TablePlan(model, vname, vonly, gates)
    for x in model.state_names:
        if x in gates:
            plan.order += [("E", x), ("G", x)]
    rw = _Rewriter(plan, known, costly)
    for n, e in model.expressions:
        if n not in costly:  # costly V-only intermediates are read from the table where used
            plan.body.append((n, rw(_parse(e))))
    for x in model.state_names:
        if x in gates:
            plan.updates.append(("lut", plan.order.index(("E", x)), plan.order.index(("G", x))))
        elif x in all_gates:
            plan.updates.append(("rl", rw(_parse(model.derivatives[x])), rw(_parse(all_gates[x][1]))))
        else:
            plan.updates.append(("euler", rw(_parse(model.derivatives[x]))))
    return plan


def _recip(n: tuple, params: frozenset) -> tuple:
    """a / b with b made of parameters and numbers only -> a * (1 / b): the reciprocal is folded at
    compile time or hoisted out of the voxel loop (a division is ~10x a multiplication in SIMD
    units; the product differs from the quotient by at most an ulp)."""
    n = _map(n, lambda x: _recip(x, params))
    b = n[2] if n[0] == "div" else None
    if b is not None and _names(b) <= params and not (b[0] == "num" and b[1] in (1.0, 2.0, 4.0, 0.5)):
        return ("mul", n[1], ("div", ("num", 1.0), b))
    return n


def _fewer_divisions(n: tuple) -> tuple:
    """Merge divisions (each ~10x a multiplication in SIMD units) by exact algebra; the rounding
    changes by a few ulp, which the table step's interpolation error dwarfs:
      (a / b) / c -> a / (b c),   (a / b) (c / d) -> (a c) / (b d),
      a / (b +- c / d) -> (a d) / (b d +- c)."""
    n = _map(n, _fewer_divisions)
    k = n[0]
    if k not in ("div", "mul"):
        return n
    a, b = n[1], n[2]
    if k == "div" and a[0] == "div":
        return _fewer_divisions(("div", a[1], ("mul", a[2], b)))
    if k == "mul" and a[0] == "div" and b[0] == "div":
        return ("div", ("mul", a[1], b[1]), ("mul", a[2], b[2]))
    if k == "div" and b[0] in ("add", "sub") and b[2][0] == "div":
        c, d = b[2][1], b[2][2]
        return ("div", ("mul", a, d), (b[0], ("mul", b[1], d), c))
    return n


def _c(tree: tuple, params: frozenset = frozenset()) -> str:
    return c_expr(_str(_expand_pow(_fewer_divisions(_recip(tree, params)) if params else tree)))


def lut_step_source(plan: TablePlan) -> str:
    """`model_rl_step_lut`: the fused Rush-Larsen / forward-Euler step reading the tables; falls back
    to the exact `model_rl_step` when V is outside the table (or not a number). The function's own
    identifiers start with `_twin`, which models may not use (kernels/ode/model.py)."""
    model = plan.model
    st, pa, inp = model.state_names, model.parameter_names, model.input_names
    nc = plan.n_columns
    lines = ["DEVICE void model_rl_step_lut(real t, const real* y, const real* p, const real* u, real _twin_h,",
             "                              real* yn, const real* _twin_lut, real _twin_v0, real _twin_idv,",
             "                              int _twin_rows) {"]
    if nc == 0:
        lines += ["    (void)_twin_lut; (void)_twin_v0; (void)_twin_idv; (void)_twin_rows;",
                  "    model_rl_step(t, y, p, u, _twin_h, yn);", "}"]
        return "\n".join(lines) + "\n"
    lines += [f"    const real _twin_q = (y[{st.index(plan.vname)}] - _twin_v0) * _twin_idv;",
              "    if (!(_twin_q >= 0 && _twin_q < (real)(_twin_rows - 1))) {",
              "        model_rl_step(t, y, p, u, _twin_h, yn);",
              "        return;",
              "    }",
              "    const int _twin_i = (int)_twin_q;",
              "    const real _twin_w = _twin_q - (real)_twin_i;",
              f"    const real* _twin_r0 = _twin_lut + (twin_idx)_twin_i * {nc};",
              f"    const real* _twin_r1 = _twin_r0 + {nc};"]
    lines += [f"    const real {PREFIX}{k} = _twin_r0[{k}] + _twin_w * (_twin_r1[{k}] - _twin_r0[{k}]);"
              for k in range(nc)]
    lines += [f"    const real {n} = y[{i}];" for i, n in enumerate(st)]
    lines += [f"    const real {n} = p[{i}];" for i, n in enumerate(pa)]
    lines += [f"    const real {n} = u[{i}];" for i, n in enumerate(inp)]
    P = frozenset(pa)
    lines += [f"    const real {n} = {_c(t, P)};" for n, t in plan.body]
    lines += ["    (void)t;"] + [f"    (void){n};" for n in st + pa + inp + [n for n, _ in plan.body]]
    lines += [f"    (void){PREFIX}{k};" for k in range(nc)]
    for i, (x, u) in enumerate(zip(st, plan.updates)):
        if u[0] == "lut":
            lines.append(f"    yn[{i}] = {x} * {PREFIX}{u[1]} + {PREFIX}{u[2]};")
        elif u[0] == "rl":
            lines.append(f"    yn[{i}] = tissue_rl_update({x}, {_c(u[1], P)}, {_c(u[2], P)}, _twin_h);")
        else:
            lines.append(f"    yn[{i}] = {x} + _twin_h * ({_c(u[1], P)});")
    lines.append("}")
    return "\n".join(lines) + "\n"


def build_table(plan: TablePlan, params: np.ndarray, dt: float, v_lo: float = V_LO, v_hi: float = V_HI,
                dv: float = DV) -> tuple[np.ndarray, float, float]:
    """Rows [n_rows, n_columns] on V = v_lo + k dv (float64), evaluated with NumPy from the model's
    exact expressions. Returns (table, v0, 1/dv). Isolated non-finite entries (a removable
    singularity such as x/(1-exp(-x)) at x = 0 landing on a node) are replaced by the mean of the
    two neighbouring rows; a column non-finite over a wider range shrinks the table to the largest
    finite V interval (outside it the step uses the exact formulas)."""
    model = plan.model
    n_rows = int(round((v_hi - v_lo) / dv)) + 1
    V = v_lo + dv * np.arange(n_rows)
    ns: dict = {"np": np}
    ns.update({n: float(v) for n, v in zip(model.parameter_names, np.asarray(params, float))})
    ns[plan.vname] = V
    cols = []
    with np.errstate(all="ignore"):
        for n, e in plan.vonly:
            ns[n] = eval(to_numpy_expr(e), ns) * np.ones_like(V)  # checked model expressions only
        for kind, what in plan.order:
            if kind == "expr":
                cols.append(eval(to_numpy_expr(_str(what)), ns) * np.ones_like(V))
                continue
            a, b = (eval(to_numpy_expr(s), ns) * np.ones_like(V) for s in plan.gates[what])
            z = b * dt
            if kind == "E":
                cols.append(np.exp(z))
            else:
                phi = np.where(np.abs(z) < 1e-8, 1.0 + 0.5 * z, np.expm1(z) / z)
                cols.append(dt * (a * phi))
    T = np.ascontiguousarray(np.stack(cols, axis=1) if cols else np.zeros((n_rows, 0)))
    bad = ~np.isfinite(T)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        for r in rows:
            if 0 < r < n_rows - 1 and np.isfinite(T[r - 1]).all() and np.isfinite(T[r + 1]).all():
                T[r] = 0.5 * (T[r - 1] + T[r + 1])
        ok = np.isfinite(T).all(axis=1)
        if not ok.all():  # keep the longest finite run of rows
            best, start, lo, hi = 0, None, 0, 0
            for i, g in enumerate(list(ok) + [False]):
                if g and start is None:
                    start = i
                elif not g and start is not None:
                    if i - start > best:
                        best, lo, hi = i - start, start, i
                    start = None
            if best < 2:
                raise ValueError(f"model {model.name}: no finite lookup-table range for {plan.vname}")
            T = np.ascontiguousarray(T[lo:hi])
            v_lo = float(V[lo])
    return T, float(v_lo), 1.0 / dv


def membrane_state(model: Model, vname: str = "V") -> str | None:
    """The state holding the membrane potential: a state named `vname`, or the state the model's
    output `vname` is (the CellML importer maps the membrane voltage to output V); None if neither."""
    if vname in model.state_names:
        return vname
    for o in model.outputs:
        if o.name == vname and o.expr.strip() in model.state_names:
            return o.expr.strip()
    return None


class TableCache:
    """The table of one (parameters, dt): built on first use, rebuilt only if either changes."""

    def __init__(self, plan: TablePlan | None):
        self.plan, self.key, self.value = plan, None, None

    def get(self, params: np.ndarray, dt: float):
        if self.plan is None or self.plan.n_columns == 0:
            return None
        key = (np.asarray(params, float).tobytes(), float(dt))
        if key != self.key:
            self.value, self.key = build_table(self.plan, params, dt), key
        return self.value


_SIMD_OK = {"r_exp": "twin_v_exp", "r_log": "twin_v_log", "r_sqrt": "sqrt", "r_fabs": "fabs"}


def _simd_c(tree: tuple, params: frozenset) -> str | None:
    """C for a tree inside the SIMD loop, or None if it calls something that would not vectorise."""
    import re

    s = _c(tree, params)
    for f in set(re.findall(r"\b(r_[a-z0-9]+)\(", s)):
        if f not in _SIMD_OK:
            return None
        s = re.sub(rf"\b{f}\(", _SIMD_OK[f] + "(", s)
    return s


def lut_simd_source(plan: TablePlan | None) -> str:
    """`tissue_cell_lut_range` (C only): the table step for voxels [c0, c1) as one `omp simd` loop over
    the SoA arrays, with the vectorisable exp/log of simd_math.c. Voxels outside the tissue or the
    table keep their state here (the caller redoes those with the exact scalar step).
    TISSUE_LUT_SIMD is 0 when the model needs a function that would not vectorise."""
    off = "#define TISSUE_LUT_SIMD 0\n#define TISSUE_LUT_VIDX (-1)\n"
    if plan is None or plan.n_columns == 0:
        return off
    model = plan.model
    st, pa, inp = model.state_names, model.parameter_names, model.input_names
    vi, nc = st.index(plan.vname), plan.n_columns
    P = frozenset(pa)
    body = []
    for n, t in plan.body:
        c = _simd_c(t, P)
        if c is None:
            return off
        body.append(f"        const real {n} = {c};")
    upd = []
    for i, (x, u) in enumerate(zip(st, plan.updates)):
        if u[0] == "lut":
            e = f"{x} * {PREFIX}{u[1]} + {PREFIX}{u[2]}"
        elif u[0] == "rl":
            f, b = _simd_c(u[1], P), _simd_c(u[2], P)
            if f is None or b is None:
                return off
            e = f"tissue_rl_update_v({x}, {f}, {b}, _twin_h)"
        else:
            f = _simd_c(u[1], P)
            if f is None:
                return off
            e = f"{x} + _twin_h * ({f})"
        upd.append(f"        const real _twin_yn{i} = {e};")
    # fused multiply-adds in this loop only (GCC): 5 % faster, values move by ~4e-15 relative, far
    # below the table's interpolation error; the exact step keeps -ffp-contract=off (NumPy rounding)
    lines = ["#define TISSUE_LUT_SIMD 1", f"#define TISSUE_LUT_VIDX {vi}",
             "#if defined(__GNUC__) && !defined(__clang__)",
             '__attribute__((optimize("fp-contract=fast")))',
             "#endif",
             "static void tissue_cell_lut_range(twin_idx _twin_c0, twin_idx _twin_c1, twin_idx _twin_n,",
             "                                  const unsigned char* _twin_mask, real* _twin_Y, real* _twin_Vs,",
             "                                  const real* p, const signed char* _twin_sid, const real* _twin_amp,",
             "                                  real t, real _twin_h, const real* _twin_lut, real _twin_v0,",
             "                                  real _twin_idv, int _twin_rows) {"]
    lines += [f"    const real {n} = p[{i}];" for i, n in enumerate(pa)]
    lines += ["    (void)t;"] + [f"    (void){n};" for n in pa]
    lines += ["    twin_idx _twin_c;", "#pragma omp simd", "    for (_twin_c = _twin_c0; _twin_c < _twin_c1; ++_twin_c) {"]
    lines += [f"        const real {n} = _twin_Y[(twin_idx){i} * _twin_n + _twin_c];" for i, n in enumerate(st)]
    if inp:
        # the load is unconditional (index 0 when unstimulated) so the loop has no branch to convert
        lines += ["        const int _twin_s = _twin_sid[_twin_c];",
                  "        const real _twin_a = _twin_amp[_twin_s >= 0 ? _twin_s : 0];",
                  f"        const real {inp[0]} = _twin_s >= 0 ? _twin_a : 0.0;"]
        lines += [f"        const real {n} = 0.0;" for n in inp[1:]]
    lines += [f"        const real _twin_q = ({plan.vname} - _twin_v0) * _twin_idv;",
              "        const int _twin_in = (_twin_mask[_twin_c] != 0) & (_twin_q >= 0) & (_twin_q < (real)(_twin_rows - 1));",
              # row = floor(q) without a float->int conversion (GCC 12 will not vectorise one fed by
              # a select, and the conversion of NaN is undefined): round q - 1/2 in the low mantissa
              # bits of 1.5 * 2^52, clamp as an integer; lanes outside the table are discarded anyway
              "        const int64_t _twin_b = twin_v_d2bits((_twin_q - 0.5) + 6755399441055744.0)"
              " - (int64_t)0x4338000000000000LL;",
              "        const int64_t _twin_i = _twin_b < 0 ? 0 : (_twin_b > _twin_rows - 2 ? (int64_t)(_twin_rows - 2)"
              " : _twin_b);",
              "        const real _twin_w = _twin_q - (twin_v_bits2d(_twin_i | (int64_t)0x4330000000000000LL)"
              " - 4503599627370496.0);",
              f"        const twin_idx _twin_o = (twin_idx)_twin_i * {nc};"]
    lines += [f"        const real {PREFIX}{k} = _twin_lut[_twin_o + {k}] + _twin_w * (_twin_lut[_twin_o + {nc + k}]"
              f" - _twin_lut[_twin_o + {k}]);" for k in range(nc)]
    lines += body + upd
    lines += [f"        (void){n};" for n, _ in plan.body]
    for i, x in enumerate(st):
        if i == vi:
            lines.append(f"        _twin_Vs[_twin_c] = _twin_in ? _twin_yn{i} : {x};")
        else:
            lines.append(f"        _twin_Y[(twin_idx){i} * _twin_n + _twin_c] = _twin_in ? _twin_yn{i} : {x};")
    lines += ["    }", "}"]
    return "\n".join(lines) + "\n"
