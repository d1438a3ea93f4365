"""Generate vectorised NumPy functions from a model declaration (the reference backend).

Arrays are structure-of-arrays: y[state, patient], p[parameter, patient], u[input, patient].
The generated source is kept on the result (`.source`) so it can be read and diffed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .model import Model

_NP_FUNCS = {"exp": "np.exp", "log": "np.log", "sqrt": "np.sqrt", "pow": "np.power", "abs": "np.abs",
             "min": "np.minimum", "max": "np.maximum", "tanh": "np.tanh", "sin": "np.sin", "cos": "np.cos",
             "ifelse": "np.where"}


class _ToNumpy(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name):
        return ast.parse("np.pi", mode="eval").body if node.id == "pi" else node

    def visit_Call(self, node: ast.Call):
        self.generic_visit(node)
        node.func = ast.parse(_NP_FUNCS[node.func.id], mode="eval").body
        return node


def to_numpy_expr(expr: str) -> str:
    tree = _ToNumpy().visit(ast.parse(expr, mode="eval"))
    return ast.unparse(tree)


@dataclass
class NumpyKernel:
    model: Model
    rhs: Callable  # rhs(t, y, p, u) -> dy
    outputs: Callable  # outputs(t, y, p, u) -> list of arrays, one per model output
    init: Callable  # init(p) -> y0
    source: str
    jac: Callable | None = None  # jac(t, y, p, u) -> J [NS, NS, m], analytic (kernels/ode/symbolic.py)
    dfdt: Callable | None = None  # dfdt(t, y, p, u) -> explicit df/dt [NS, m]
    rl_b: Callable | None = None  # rl_b(t, y, p, u) -> df_i/dy_i of gating states, 0 elsewhere [NS, m]


def generate(model: Model) -> NumpyKernel:
    st, pa, inp = model.state_names, model.parameter_names, model.input_names
    head = ["    " + f"{n} = y[{i}]" for i, n in enumerate(st)]
    head += ["    " + f"{n} = p[{i}]" for i, n in enumerate(pa)]
    head += ["    " + f"{n} = u[{i}]" for i, n in enumerate(inp)]
    inter = ["    " + f"{n} = {to_numpy_expr(e)}" for n, e in model.expressions]
    # `+ 0 * t` keeps every derivative an array of the right shape even when it is a constant
    body = ["    dy = np.empty_like(y)"]
    body += ["    " + f"dy[{i}] = {to_numpy_expr(model.derivatives[n])}" for i, n in enumerate(st)]
    outs = ", ".join(f"np.broadcast_to({to_numpy_expr(o.expr)}, y.shape[1:])" for o in model.outputs)
    init_lines = ["    " + f"{n} = p[{i}]" for i, n in enumerate(pa)]
    init_vals = []
    for s in model.states:
        e = to_numpy_expr(s.init) if isinstance(s.init, str) else repr(float(s.init))
        init_vals.append(f"np.broadcast_to(np.asarray({e}, dtype=float), p.shape[1:])")
    src = "\n".join(
        [f"# generated from model {model.name!r}", "def rhs(t, y, p, u):", *head, *inter, *body, "    return dy", "",
         "def outputs(t, y, p, u):", *head, *inter, f"    return [{outs}]", "",
         "def init(p):", *init_lines,
         (f"    return np.array([{', '.join(init_vals)}], dtype=float)" if init_vals
          else "    return np.zeros((0,) + p.shape[1:])"), ""]
    )
    src += "\n" + _derivative_source(model, head, inter)
    ns: dict = {"np": np}
    exec(compile(src, f"<twin-model {model.name}>", "exec"), ns)  # source built from a checked declaration
    return NumpyKernel(model, ns["rhs"], ns["outputs"], ns["init"], src, ns["jac"], ns["dfdt"], ns["rl_b"])


def _derivative_source(model: Model, head: list[str], inter: list[str]) -> str:
    """jac, dfdt and rl_b: analytic derivatives for Rosenbrock and Rush–Larsen steps."""
    from .symbolic import gating, jacobian, time_derivative

    extras, entries = jacobian(model)
    t_extras, t_entries = time_derivative(model)
    gates = gating(model)
    n = len(model.states)
    lines = ["def jac(t, y, p, u):", *head, *inter]
    lines += ["    " + f"{k} = {to_numpy_expr(e)}" for k, e in extras]
    # results go in `dy`, a name models may not use (model.RESERVED)
    lines += ["    dy = np.zeros((%d, %d) + y.shape[1:])" % (n, n)]
    lines += ["    " + f"dy[{i}, {j}] = {to_numpy_expr(e)}" for (i, j), e in sorted(entries.items())]
    lines += ["    return dy", "", "def dfdt(t, y, p, u):", *head, *inter]
    lines += ["    " + f"{k} = {to_numpy_expr(e)}" for k, e in t_extras]
    lines += ["    dy = np.zeros_like(y)"]
    lines += ["    " + f"dy[{i}] = {to_numpy_expr(e)}" for i, e in sorted(t_entries.items())]
    lines += ["    return dy", "", "def rl_b(t, y, p, u):", *head, *inter, "    dy = np.zeros_like(y)"]
    lines += ["    " + f"dy[{model.state_names.index(x)}] = {to_numpy_expr(b)}" for x, (_, b) in gates.items()]
    lines += ["    return dy", ""]
    return "\n".join(lines)
