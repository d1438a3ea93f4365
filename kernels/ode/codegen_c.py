"""Generate C for the `cpu` (OpenMP) and `cuda` (CuPy RawModule) backends from a model declaration.

The generated functions work on one patient with its state in local arrays; the integrator
template (integrator.c) runs a patient's whole time loop around them. One source serves both
backends: macros in the header pick `__device__`/OpenMP.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .model import Model

# r_* resolve to the double or float libm/CUDA functions (see HEADER)
_C_FUNCS = {"exp": "r_exp", "log": "r_log", "sqrt": "r_sqrt", "pow": "r_pow", "abs": "r_fabs", "min": "r_fmin",
            "max": "r_fmax", "tanh": "r_tanh", "sin": "r_sin", "cos": "r_cos"}
_BIN = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_CMP = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}

TEMPLATE_DIR = Path(__file__).parent


def _num(v) -> str:
    r = repr(float(v))
    return r if ("e" in r or "." in r or "inf" in r or "nan" in r) else r + ".0"


def to_c(node: ast.AST) -> str:
    if isinstance(node, ast.Expression):
        return to_c(node.body)
    if isinstance(node, ast.Constant):
        return _num(node.value)
    if isinstance(node, ast.Name):
        return "TWIN_PI" if node.id == "pi" else node.id
    if isinstance(node, ast.UnaryOp):
        return f"(-{to_c(node.operand)})" if isinstance(node.op, ast.USub) else to_c(node.operand)
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.Pow):
            return f"r_pow({to_c(node.left)}, {to_c(node.right)})"
        return f"({to_c(node.left)} {_BIN[type(node.op)]} {to_c(node.right)})"
    if isinstance(node, ast.Compare):
        return f"({to_c(node.left)} {_CMP[type(node.ops[0])]} {to_c(node.comparators[0])})"
    if isinstance(node, ast.Call):
        args = [to_c(a) for a in node.args]
        if node.func.id == "ifelse":
            return f"({args[0]} ? {args[1]} : {args[2]})"
        return f"{_C_FUNCS[node.func.id]}({', '.join(args)})"
    raise ValueError(f"cannot translate {ast.dump(node)} to C")


def c_expr(expr: str) -> str:
    return to_c(ast.parse(expr, mode="eval"))


def model_source(model: Model) -> str:
    """The model as C: rhs, outputs and init for one patient, plus its sizes."""
    st, pa, inp = model.state_names, model.parameter_names, model.input_names
    unpack = [f"    const real {n} = y[{i}];" for i, n in enumerate(st)]
    unpack += [f"    const real {n} = p[{i}];" for i, n in enumerate(pa)]
    unpack += [f"    const real {n} = u[{i}];" for i, n in enumerate(inp)]
    inter = [f"    const real {n} = {c_expr(e)};" for n, e in model.expressions]
    silence = ["    (void)t;"] + [f"    (void){n};" for n in st + pa + inp] + [f"    (void){n};" for n, _ in model.expressions]
    rhs = [f"    dy[{i}] = {c_expr(model.derivatives[n])};" for i, n in enumerate(st)]
    outs = [f"    o[{i}] = {c_expr(o.expr)};" for i, o in enumerate(model.outputs)]
    init_unpack = [f"    const real {n} = p[{i}];" for i, n in enumerate(pa)] + [f"    (void){n};" for n in pa]
    inits = [f"    y[{i}] = {c_expr(s.init) if isinstance(s.init, str) else _num(s.init)};" for i, s in enumerate(model.states)]
    n_in = max(len(inp), 1)
    from .symbolic import gating, jacobian, time_derivative

    extras, entries = jacobian(model)
    t_extras, t_entries = time_derivative(model)
    gates = gating(model)
    n = len(st)
    jac = ["DEVICE void model_jac(real t, const real* y, const real* p, const real* u, real* o) {",
           *unpack, *inter, *silence,
           *[f"    const real {k} = {c_expr(e)};" for k, e in extras],
           f"    for (int q = 0; q < {n * n}; ++q) o[q] = 0;",
           *[f"    o[{i * n + j}] = {c_expr(e)};" for (i, j), e in sorted(entries.items())], "}"]
    dfdt = ["DEVICE void model_dfdt(real t, const real* y, const real* p, const real* u, real* o) {",
            *unpack, *inter, *silence,
            *[f"    const real {k} = {c_expr(e)};" for k, e in t_extras],
            f"    for (int q = 0; q < {n}; ++q) o[q] = 0;",
            *[f"    o[{i}] = {c_expr(e)};" for i, e in sorted(t_entries.items())], "}"]
    rlb = ["DEVICE void model_rl_b(real t, const real* y, const real* p, const real* u, real* o) {",
           *unpack, *inter, *silence, f"    for (int q = 0; q < {n}; ++q) o[q] = 0;",
           *[f"    o[{st.index(x)}] = {c_expr(b)};" for x, (_, b) in gates.items()], "}"]
    return "\n".join([
        f"/* generated from model '{model.name}' */",
        f"#define NS {len(st)}",
        f"#define NP {len(pa)}",
        f"#define NP_ARR {max(len(pa), 1)}",
        f"#define NIN {n_in}",
        f"#define NOUT {max(len(model.outputs), 1)}",
        "DEVICE void model_rhs(real t, const real* y, const real* p, const real* u, real* dy) {",
        *unpack, *inter, *silence, *rhs, "}",
        "DEVICE void model_outputs(real t, const real* y, const real* p, const real* u, real* o) {",
        *unpack, *inter, *silence, *outs, "}",
        "DEVICE void model_init(const real* p, real* y) {",
        *init_unpack, *inits, "}",
        *jac, *dfdt, *rlb,
        "",
    ])


HEADER = r"""
/* twin-engine ODE kernel: one patient per OpenMP iteration or per CUDA thread. */
#ifdef __CUDACC__
#define DEVICE __device__ static inline
#define KERNEL_CUDA 1
#define TWIN_INF (__longlong_as_double(0x7ff0000000000000LL))
#define TWIN_NAN (__longlong_as_double(0x7ff8000000000000LL))
#define isfinite_r(x) isfinite(x)
#else
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#define DEVICE static inline
#define TWIN_INF (INFINITY)
#define TWIN_NAN (NAN)
#define isfinite_r(x) isfinite(x)
#endif
#ifndef TWIN_REAL
#define TWIN_REAL double
#endif
typedef TWIN_REAL real;
typedef long long twin_idx; /* array index type: no size_t, which NVRTC does not define without headers */
#if TWIN_FLOAT32
#define r_exp expf
#define r_log logf
#define r_sqrt sqrtf
#define r_pow powf
#define r_fabs fabsf
#define r_fmin fminf
#define r_fmax fmaxf
#define r_tanh tanhf
#define r_sin sinf
#define r_cos cosf
#define r_expm1 expm1f
#else
#define r_exp exp
#define r_log log
#define r_sqrt sqrt
#define r_pow pow
#define r_fabs fabs
#define r_fmin fmin
#define r_fmax fmax
#define r_tanh tanh
#define r_sin sin
#define r_cos cos
#define r_expm1 expm1
#endif
#if TWIN_FLOAT32
#define TWIN_TINY 1e-30f    /* smallest safe divisor */
#define TWIN_EPS 1.1920929e-07f
#define TWIN_HMIN 1e-6f     /* step-size floor relative to |t| (≈ 8 ulp of float) */
#else
#define TWIN_TINY 1e-300
#define TWIN_EPS 2.220446049250313e-16
#define TWIN_HMIN 1e-14
#endif
#define TWIN_PI 3.141592653589793
"""


def kernel_source(model: Model, precision: str = "float64") -> str:
    """Complete translation unit for one model: header, model functions, integrator."""
    integrator = (TEMPLATE_DIR / "integrator.c").read_text()
    prec = "#define TWIN_REAL float\n#define TWIN_FLOAT32 1\n" if precision == "float32" else "#define TWIN_FLOAT32 0\n"
    return prec + HEADER + model_source(model) + integrator
