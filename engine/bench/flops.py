"""Counted flops of an ODE kernel: RHS flops from the model's expression tree × RHS evaluations
counted on the NumPy reference, plus the integrator's own arithmetic per step from its tableau.

Counting rules (stated in every report):
* expression tree: every binary + − × ÷ and ** is 1 flop, every function call (exp, log, sqrt, pow,
  abs, min, max, tanh, sin, cos, ifelse) is 1 flop, every comparison is 1 flop, unary minus is 0.
  Transcendentals cost far more than 1 flop in practice, so counted GFLOP/s understate the work
  of models full of exp/pow (UVA/Padova); they are also counted separately.
* one RHS evaluation = the intermediate expressions the derivatives need (transitively) + the
  derivatives; outputs evaluated at sample times are not counted.
* RHS evaluations are counted by wrapping the generated NumPy RHS of the reference kernel
  (`kernels.compile.integrate` is wrapped for the duration of a call) and summing patients per
  call. The compiled kernels run the same algorithm with the same rounding (tests/test_kernel_parity),
  so they take the same steps; flops per patient measured on a subset are scaled to the full case.
* DOPRI5 stepper per attempted step, counted from the NumPy reference's arithmetic and the
  tableau: stage combinations 2 per nonzero a_ij per state (+1 per nonzero a_ij for h·a_ij),
  stage times 2 per stage, error estimate 2 per nonzero e_i per state, error norm 8 per state
  (|y|, |y_new|, max, ×rtol, +atol, ÷, square, sum) + 2, step-size factor 8. Attempted steps are
  estimated as RHS evaluations / 6 (FSAL: 6 new stages per step; the few extra evaluations after
  doses and for the initial step make this a slight over-estimate of steps).
"""

from __future__ import annotations

import ast
from contextlib import contextmanager

from kernels.ode.model import Model

RULES = ("flops = RHS evaluations (counted on the NumPy reference) × RHS flops (expression tree: "
         "+ − × ÷ ** comparisons and each function call = 1, unary minus = 0) + DOPRI5 stepper flops "
         "per step (from the tableau) × steps (≈ RHS evaluations / 6)")

_SPECIAL = {"exp", "log", "sqrt", "pow", "tanh", "sin", "cos"}


def expr_flops(expr: str) -> tuple[int, int]:
    """(flops, of which transcendental calls) of one expression under the counting rules."""
    flops = special = 0
    for node in ast.walk(ast.parse(expr, mode="eval")):
        if isinstance(node, ast.BinOp):
            flops += 1
            if isinstance(node.op, ast.Pow):
                special += 1
        elif isinstance(node, ast.Compare):
            flops += 1
        elif isinstance(node, ast.Call):
            flops += 1
            if isinstance(node.func, ast.Name) and node.func.id in _SPECIAL:
                special += 1
    return flops, special


def _names(expr: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name)}


def rhs_flops(model: Model) -> dict:
    """Flops of one RHS evaluation: needed intermediates + derivatives."""
    inter = dict(model.expressions)
    need: set[str] = set()
    todo = [n for e in model.derivatives.values() for n in _names(e) if n in inter]
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo += [m for m in _names(inter[n]) if m in inter]
    f = s = 0
    for n, e in model.expressions:
        if n in need:
            a, b = expr_flops(e)
            f, s = f + a, s + b
    for e in model.derivatives.values():
        a, b = expr_flops(e)
        f, s = f + a, s + b
    return {"flops": f, "transcendental": s, "intermediates": len(need), "states": len(model.states)}


def dopri5_step_flops(n_states: int) -> int:
    from kernels.ode.integrate_numpy import _A, _E

    nnz_a = sum(1 for row in _A for a in row if a)
    nnz_e = sum(1 for e in _E if e)
    stages = len(_A) - 1
    per_state = 2 * nnz_a + 2 * nnz_e + 8
    return per_state * n_states + nnz_a + 2 * stages + 2 + 8


def stepper_flops(method: str, n_states: int) -> int | None:
    if method == "dopri5":
        return dopri5_step_flops(n_states)
    if method == "rk4":
        return 11 * n_states + 6
    return None  # rodas4 / rush_larsen: not counted


EVALS_PER_STEP = {"dopri5": 6, "rk4": 4}


@contextmanager
def count_rhs_evaluations():
    """While active, NumPy-reference kernels count patient-RHS evaluations into the dict."""
    import kernels.compile as kc

    counter = {"evals": 0, "calls": 0}
    orig = kc.integrate

    def wrapped(rhs, *args, **kw):
        def counted(t, y, p, u):
            counter["calls"] += 1
            counter["evals"] += y.shape[1] if getattr(y, "ndim", 1) == 2 else 1
            return rhs(t, y, p, u)

        return orig(counted, *args, **kw)

    kc.integrate = wrapped
    try:
        yield counter
    finally:
        kc.integrate = orig


def flops_per_patient(model: Model, method: str, evals: int, patients: int) -> dict:
    r = rhs_flops(model)
    per_eval = r["flops"]
    step = stepper_flops(method, len(model.states))
    k = EVALS_PER_STEP.get(method)
    total = evals * per_eval + (evals / k * step if step is not None and k else 0.0)
    return {"rhs_flops": per_eval, "rhs_transcendental": r["transcendental"], "step_flops": step,
            "rhs_evals_per_patient": evals / patients, "steps_per_patient": evals / k / patients if k else None,
            "flops_per_patient": total / patients, "counted_on_patients": patients, "method": method}
