"""Symbolic differentiation (kernels/ode/symbolic.py): rules, model Jacobians, gating, code generation.

Tolerances. Unit rules and model Jacobians are checked against finite differences:
* central differences with step h = 1e-6 * max(|x|, 1): truncation error ~h^2 |f'''| ~ 1e-12 and
  rounding error ~eps |f| / h ~ 2e-10 |f| / max(|x|, 1), so a tolerance of 1e-6 relative to
  |f'| + |f| / max(|x|, 1) (rows of a Jacobian: |J_ij| + (|f_i| + sum_k |J_ik y_k|) / |y_j|, the size
  of the terms that cancel in the difference) leaves a margin of > 1000 while a wrong rule or a
  missing chain-rule factor is off by O(|f'|);
* complex step (Im f(y + i h e_j) / h, h = 1e-30 * |y_j|), exact to rounding with no cancellation, so
  each entry must match to rtol 1e-6 on its own (all our models' RHS are complex-analytic away from
  their kinks; np.where / np.maximum compare complex numbers by real part first, which picks the same
  branch as the real evaluation).
Random points avoid kinks: patients where any comparison of an ifelse / min / max / abs is within
1e-4 (relative) of a tie are dropped, so no difference straddles a branch switch.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import zlib

import numpy as np
import pytest

from engine.models import MODELS
from kernels.ode import codegen_c
from kernels.ode.codegen_c import c_expr
from kernels.ode.codegen_numpy import generate, to_numpy_expr
from kernels.ode.model import Model, Output, Parameter, State, check_expr
from kernels.ode.symbolic import diff, gating, jacobian, names_in, simplify, substitute, time_derivative


def _ev(expr: str, env: dict):
    return eval(to_numpy_expr(expr), {"np": np}, env)  # expressions from our own checked language


# ============================================================================ (1) unit rules
# (expression, x range, y range); derivatives w.r.t. x and y checked at random points
RULES = [
    ("x + y", (-3, 3), (-3, 3)),
    ("x - 2.5 * y", (-3, 3), (-3, 3)),
    ("-x * y", (-3, 3), (-3, 3)),
    ("x * y * x", (-3, 3), (-3, 3)),
    ("x / y", (-3, 3), (0.5, 3)),
    ("y / (1 + x * x)", (-3, 3), (-3, 3)),
    ("x ** 3", (-3, 3), (0, 1)),  # constant exponent, negative base
    ("(x - y) ** 2", (-3, 3), (-3, 3)),
    ("x ** -2", (0.3, 3), (0, 1)),
    ("x ** 2.5", (0.1, 3), (0, 1)),
    ("x ** y", (0.1, 3), (-2, 2)),  # general power
    ("y ** x", (-2, 2), (0.1, 3)),
    ("pow(x, y)", (0.1, 3), (-2, 2)),
    ("pow(x, 3)", (-3, 3), (0, 1)),
    ("x ** (y * y)", (0.1, 3), (-2, 2)),
    ("exp(x * y)", (-2, 2), (-1, 1)),
    ("log(x * y)", (0.1, 3), (0.1, 3)),
    ("sqrt(x + y * y)", (0.1, 3), (-2, 2)),
    ("tanh(x * y)", (-2, 2), (-2, 2)),
    ("sin(x * y)", (-3, 3), (-1, 1)),
    ("cos(x / y)", (-3, 3), (0.5, 2)),
    ("pi * x * t", (-3, 3), (-3, 3)),
    ("abs(x - y)", (-3, 3), (-3, 3)),
    ("abs(x) * y", (-3, 3), (-3, 3)),
    ("min(x, y * x)", (-3, 3), (-3, 3)),
    ("max(x * x, y)", (-3, 3), (-3, 3)),
    ("min(x, 1)", (-3, 3), (-3, 3)),
    ("ifelse(x < y, x * x, y * exp(x))", (-3, 3), (-3, 3)),
    ("ifelse(x >= 1, log(x), -x * y)", (0.1, 3), (-3, 3)),
    ("ifelse(x * y > 0.5, tanh(x) / y, max(x, y) ** 2)", (-3, 3), (0.2, 3)),
    ("exp(-x / y) * sqrt(x * x + y * y) / (1 + tanh(x - y)) - cos(pi * x) ** 3", (-3, 3), (0.3, 3)),
]
KINKY = [r for r in RULES if any(f in r[0] for f in ("abs", "min", "max", "ifelse"))]


def _kink_args(expr: str) -> list[tuple[str, str]]:
    """(left, right) of every comparison in expr, including those implied by abs / min / max."""
    out = []
    for node in ast.walk(ast.parse(expr, mode="eval")):
        if isinstance(node, ast.Compare):
            out.append((ast.unparse(node.left), ast.unparse(node.comparators[0])))
        elif isinstance(node, ast.Call) and node.func.id in ("min", "max"):
            out.append((ast.unparse(node.args[0]), ast.unparse(node.args[1])))
        elif isinstance(node, ast.Call) and node.func.id == "abs":
            out.append((ast.unparse(node.args[0]), "0"))
    return out


def _away_from_kinks(exprs, env) -> np.ndarray:
    ok = True
    for e in exprs:
        for l, r in _kink_args(e):
            lv, rv = np.real(_ev(l, env)), np.real(_ev(r, env))
            ok = ok & (np.abs(lv - rv) > 1e-4 * (np.abs(lv) + np.abs(rv) + 1e-300))
    return np.broadcast_to(ok, np.shape(env["x"]))


@pytest.mark.parametrize("expr,xr,yr", RULES, ids=[r[0] for r in RULES])
def test_rule_matches_central_differences(expr, xr, yr):
    rng = np.random.default_rng(zlib.crc32(expr.encode()))
    x = rng.uniform(*xr, 400)
    y = rng.uniform(*yr, 400)
    t = rng.uniform(0.5, 2.0, 400)
    env = {"x": x, "y": y, "t": t}
    keep = _away_from_kinks([expr], env)
    x, y, t = x[keep], y[keep], t[keep]
    assert x.size > 200
    for var in ("x", "y", "t"):
        d = diff(expr, var)
        check_expr(d, {"x", "y", "t"}, d)
        base = {"x": x, "y": y, "t": t}
        an = np.broadcast_to(_ev(d, base), x.shape)
        s = np.maximum(np.abs(base[var]), 1.0)
        h = 1e-6 * s
        up, dn = dict(base), dict(base)
        up[var] = base[var] + h
        dn[var] = base[var] - h
        fd = (_ev(expr, up) - _ev(expr, dn)) / (2 * h)
        f = np.abs(_ev(expr, base))
        tol = 1e-6 * (np.abs(an) + f / s)
        bad = np.abs(an - fd) > tol
        assert not bad.any(), (expr, var, d, x[bad][:3], y[bad][:3], an[bad][:3], fd[bad][:3])


@pytest.mark.parametrize("expr,xr,yr", KINKY, ids=[r[0] for r in KINKY])
def test_rule_points_cover_both_branches(expr, xr, yr):
    """The random points of the rule test visit both sides of every kink."""
    rng = np.random.default_rng(zlib.crc32(expr.encode()))
    env = {"x": rng.uniform(*xr, 400), "y": rng.uniform(*yr, 400), "t": rng.uniform(0.5, 2.0, 400)}
    for l, r in _kink_args(expr):
        side = _ev(l, env) - _ev(r, env) > 0
        assert side.any() and (~side).any(), (expr, l, r)


def test_simplification_identities():
    assert simplify("0 * x") == "0"
    assert simplify("x * 1") == "x"
    assert simplify("0 + x") == "x"
    assert simplify("x - 0") == "x"
    assert simplify("x / 1") == "x"
    assert simplify("-(0)") == "0"
    assert simplify("-(-x)") == "x"
    assert simplify("2 * 3 + x") == "6 + x"
    assert simplify("ifelse(x > 0, y, y)") == "y"
    assert simplify("ifelse(2 > 1, x, y)") == "x"
    assert simplify("exp(0) * x ** 1") == "x"
    assert simplify("x - x") == "0"
    assert simplify("1 / 0 + x") == "1 / 0 + x"  # division by zero is not folded
    assert diff("x * y", "z") == "0"
    assert diff("3 * x + y", "x") == "3"
    assert diff("x ** 2", "x") == "2 * x"
    assert diff("-x", "x") == "-1"
    assert diff("sigma * (y - x)", "x") == "-sigma"
    assert diff("a * exp(b)", "x") == "0"
    assert diff("(-2) ** x", "y") == "0"
    # printed forms reparse to the same value (precedence of unary minus and **)
    env = {"x": np.array([1.7, 0.6]), "y": np.array([0.3, -2.2])}
    for e in ("-(x * y)", "-x ** 2", "(-x) ** 2", "x ** -y", "x - (y - x)", "x / (y * x)", "-(x - y) / y"):
        np.testing.assert_allclose(_ev(simplify(e), env), _ev(e, env), rtol=1e-15)


def test_known_chains_through_names():
    # C = A / V, f = k * C ** 2: df/dA = k * 2 C * dC/dA
    d = diff("k * C ** 2", "A", {"C": "1 / V"})
    env = {"k": 1.3, "C": 0.7, "V": 4.0}
    assert np.isclose(_ev(d, env), 1.3 * 2 * 0.7 / 4.0, rtol=1e-14)
    assert diff("k * C", "A", {"C": "0"}) == "0"


def test_substitute():
    assert substitute("sigma * (Y - X)", {"X": "0"}) == "sigma * Y"
    assert substitute("x * y + y", {"x": "y + 1", "y": "x"}) == "(y + 1) * x + x"  # simultaneous
    assert substitute("ifelse(x > 0, x, -x)", {"x": "2"}) == "2"


@pytest.mark.parametrize("expr,what", [
    ("x % 2", "Mod"), ("x // 2", "FloorDiv"), ("foo(x)", "foo"), ("x if y else z", "IfExp"),
    ("x < y", "comparison"), ("ifelse(x == y, 1, 2)", "comparison"), ("ifelse(0 < x < 1, 1, 2)", "comparison"),
    ("min(x)", "min"), ("x.real", "Attribute"), ("'a'", "constant"), ("not x", "Not"), ("True * x", "True"),
    ("np.exp(x)", "np.exp"), ("exp(x, base=2)", "keyword"), ("x +", "parse"),
])
def test_unknown_constructs_are_named(expr, what):
    with pytest.raises(ValueError, match=what):
        diff(expr, "x")


# ============================================================================ (2) model Jacobians
N = 48
# typical magnitudes for states whose initial value is 0 (defaults: 10), and inputs (default: 1)
STATE_SCALE = {
    "uva_padova_t1d": {"Qsto1": 1e4, "Qsto2": 1e4, "Qgut": 5e3, "X": 20.0},
    "bergman_minimal": {"X": 1e-2},
}
INPUT_SCALE = {
    "uva_padova_t1d": {"CHO": 5.0, "insulin": 0.02, "last_Qsto": 2e4, "last_foodtaken": 20.0},
}
# wide enough that both EGP / Erenal branches are visited
STATE_SPREAD = {"uva_padova_t1d": {"Gp": 0.4, "Id": 0.8}}


def _point(model, seed=0):
    rng = np.random.default_rng(seed)
    base = np.array([p.default for p in model.parameters], float)
    spread = np.exp(0.3 * rng.standard_normal((len(base), N)))
    P = np.where(base[:, None] != 0, base[:, None], 1.0) * spread
    y0 = np.abs(generate(model).init(P))
    sc = STATE_SCALE.get(model.name, {})
    sp = STATE_SPREAD.get(model.name, {})
    Y = np.empty((len(model.states), N))
    for k, s in enumerate(model.state_names):
        typ = np.where(y0[k] > 0, y0[k], sc.get(s, 10.0))
        Y[k] = typ * np.exp(sp.get(s, 0.5) * rng.standard_normal(N))
    isc = INPUT_SCALE.get(model.name, {})
    U = np.array([isc.get(n, 1.0) * np.exp(0.5 * rng.standard_normal(N)) for n in model.input_names]).reshape(-1, N)
    if model.name == "uva_padova_t1d":
        # meal size Dbar such that Qsto / Dbar spans both tanh transitions of kgut (at d and at b)
        Dbar = (Y[0] + Y[1]) / rng.uniform(0.05, 1.3, N)
        U[model.input_names.index("last_Qsto")] = 0.5 * Dbar
        U[model.input_names.index("last_foodtaken")] = 0.5 * Dbar / 1000
    t = rng.uniform(0.0, 50.0, N)
    return t, Y, P, U


def _env(model, t, Y, P, U, extras=()):
    env = {"t": t}
    env.update(zip(model.state_names, Y))
    env.update(zip(model.parameter_names, P))
    env.update(zip(model.input_names, U))
    for n, e in model.expressions:
        env[n] = _ev(e, env)
    for n, e in extras:
        env[n] = _ev(e, env)
    return env


def _kink_free(model, env, more=()):
    exprs = [e for _, e in model.expressions] + list(model.derivatives.values()) + list(more)
    ok = np.ones(np.shape(env["t"]), bool)
    for e in exprs:
        for l, r in _kink_args(e):
            lv, rv = np.real(_ev(l, env)), np.real(_ev(r, env))
            ok &= np.broadcast_to(np.abs(lv - rv) > 1e-4 * (np.abs(lv) + np.abs(rv) + 1e-300), ok.shape)
    return ok


def _analytic_jacobian(model, t, Y, P, U):
    extras, entries = jacobian(model)
    env = _env(model, t, Y, P, U, extras)
    n = len(model.states)
    J = np.zeros((n, n, Y.shape[1]))
    for (i, j), e in entries.items():
        J[i, j] = _ev(e, env)
    return J, env, extras, entries


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_jacobian_matches_finite_differences(name):
    model = MODELS[name]
    rhs = generate(model).rhs
    t, Y, P, U = _point(model, seed=sum(map(ord, name)))
    J, env, extras, entries = _analytic_jacobian(model, t, Y, P, U)
    keep = _kink_free(model, env, [e for _, e in extras] + list(entries.values()))
    assert keep.sum() >= N // 2
    t, Y, P, U, J = t[keep], Y[:, keep], P[:, keep], U[:, keep], J[..., keep]
    n = len(model.states)
    f = rhs(t, Y, P, U)
    terms = np.abs(f) + np.einsum("ikp,kp->ip", np.abs(J), np.abs(Y))  # size of what cancels in row i
    for j in range(n):
        # complex step: exact to rounding, entry by entry
        hc = 1e-30 * np.abs(Y[j])
        Yc = Y.astype(complex)
        Yc[j] = Yc[j] + 1j * hc
        Jcs = rhs(t, Yc, P.astype(complex), U.astype(complex)).imag / hc
        np.testing.assert_allclose(J[:, j], Jcs, rtol=1e-6, atol=1e-12 * np.max(np.abs(Jcs)) + 1e-300,
                                   err_msg=f"{name}: complex-step column {model.state_names[j]}")
        # central differences, tolerance scaled by the terms of each row
        h = 1e-6 * np.abs(Y[j])
        up, dn = Y.copy(), Y.copy()
        up[j] += h
        dn[j] -= h
        Jfd = (rhs(t, up, P, U) - rhs(t, dn, P, U)) / (2 * h)
        tol = 1e-6 * (np.abs(J[:, j]) + terms / np.abs(Y[j]))
        bad = np.abs(J[:, j] - Jfd) > tol
        assert not bad.any(), (name, model.state_names[j], np.argwhere(bad)[:5])
    # every structurally zero entry is zero numerically, and vice versa at these generic points
    nz = np.any(J != 0, axis=-1)
    assert set(zip(*np.nonzero(nz))) <= set(entries)


def test_glucose_points_visit_both_branches():
    model = MODELS["uva_padova_t1d"]
    t, Y, P, U = _point(model, seed=sum(map(ord, model.name)))
    env = _env(model, t, Y, P, U)
    egp_arg = env["kp1"] - env["kp2"] * env["Gp"] - env["kp3"] * env["Id"]
    assert (egp_arg > 0).any() and (egp_arg < 0).any()
    assert (env["Gp"] > env["ke2"]).any() and (env["Gp"] < env["ke2"]).any()
    assert (env["Dbar"] > 0).all()
    u1 = env["aa"] * (env["Qsto"] - env["b"] * env["Dbar"])
    u2 = env["cc"] * (env["Qsto"] - env["d"] * env["Dbar"])
    assert (np.abs(u1) < 2).sum() >= 8 and (np.abs(u2) < 2).sum() >= 8  # tanh not saturated: d(kgut) matters


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_time_derivative(name):
    model = MODELS[name]
    rhs = generate(model).rhs
    t, Y, P, U = _point(model, seed=1 + sum(map(ord, name)))
    extras, entries = time_derivative(model)
    env = _env(model, t, Y, P, U, extras)
    keep = _kink_free(model, env, [e for _, e in extras] + list(entries.values()))
    dt = np.zeros_like(Y)
    for i, e in entries.items():
        dt[i] = _ev(e, env)
    hc = 1e-30 * np.maximum(np.abs(t), 1.0)
    cs = rhs(t + 1j * hc, Y.astype(complex), P.astype(complex), U.astype(complex)).imag / hc
    np.testing.assert_allclose(dt[:, keep], cs[:, keep], rtol=1e-6, atol=1e-300)
    if name == "bergman_minimal":
        assert set(entries) == {2}
    else:
        assert entries == {}


def test_jacobian_shapes_and_names():
    ex, J = jacobian(MODELS["pk_1cmt_mm"])
    assert ex == [("_d_C__A_central", "1 / V1")]
    assert set(J) == {(0, 0), (1, 0), (1, 1)}
    ex, J = jacobian(MODELS["lorenz"])
    assert ex == [] and J[(0, 0)] == "-sigma" and J[(0, 1)] == "sigma" and J[(2, 2)] == "-beta"
    assert len(J) == 8  # d(dX/dt)/dZ is structurally zero
    ex, J = jacobian(MODELS["pk_1cmt"])
    assert ex == []  # C is not used by the derivatives: its chain term is pruned
    assert J == {(0, 0): "-ka", (1, 0): "ka", (1, 1): "-(CL / V1)"}
    ex, J = jacobian(MODELS["uva_padova_t1d"])
    assert len({e for _, e in ex}) == len(ex)  # identical chain terms are shared (d kgut / d Qsto1 = / d Qsto2)
    assert J[(1, 0)] == "kmax - _d_kgut__Qsto1 * Qsto2" and J[(1, 1)] == "-(_d_kgut__Qsto1 * Qsto2 + kgut)"


# ============================================================================ (3) gating
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gating_reproduces_rhs_exactly(name):
    model = MODELS[name]
    rhs = generate(model).rhs
    t, Y, P, U = _point(model, seed=2 + sum(map(ord, name)))
    g = gating(model)
    rng = np.random.default_rng(3)
    inter = {n for n, _ in model.expressions}
    for x, (a, b) in g.items():
        k = model.state_names.index(x)
        assert x not in names_in(a) | names_in(b)
        ab = []
        for xv in (Y[k], -Y[k], rng.uniform(-100, 100, Y.shape[1]), np.zeros(Y.shape[1])):
            Yx = Y.copy()
            Yx[k] = xv
            env = _env(model, t, Yx, P, U)
            av = np.broadcast_to(_ev(a, env), xv.shape)
            bv = np.broadcast_to(_ev(b, env), xv.shape)
            assert np.all(bv != 0)
            ab.append((av, bv))
            f = rhs(t, Yx, P, U)[k]
            np.testing.assert_allclose(av + bv * xv, f, rtol=0,
                                       atol=1e-12 * np.max(np.abs(av) + np.abs(bv * xv) + np.abs(f)),
                                       err_msg=f"{name}.{x}")
        for av, bv in ab[1:]:  # a and b do not change with x (intermediates they use do not depend on x)
            np.testing.assert_array_equal(av, ab[0][0])
            np.testing.assert_array_equal(bv, ab[0][1])
        assert (names_in(a) | names_in(b)) <= {"t"} | set(model.state_names + model.parameter_names
                                                          + model.input_names) | inter


def test_gating_expected_states():
    lor = gating(MODELS["lorenz"])
    assert set(lor) == {"X", "Y", "Z"}
    assert lor["X"] == ("sigma * Y", "-sigma")
    assert lor["Y"][1] == "-1" and lor["Z"][1] == "-beta"
    for name in ("pk_1cmt", "pk_2cmt", "pk_3cmt", "pk_2cmt_effect", "pk_2cmt_idr1", "pk_2cmt_idr2",
                 "pk_2cmt_idr3", "pk_2cmt_idr4"):
        g = gating(MODELS[name])
        assert set(g) == set(MODELS[name].state_names), name  # linear PK and IDR responses: all affine
    assert gating(MODELS["pk_1cmt"])["A_central"] == ("ka * A_depot + R_inf", "-(CL / V1)")
    assert set(gating(MODELS["pk_1cmt_mm"])) == {"A_depot"}  # Michaelis-Menten central is not affine
    # UVA/Padova: Qsto2 goes through tanh (kgut); Gp, Gt, Ip, Il, Isc1, Isc2, Gs switch on ifelse(x >= 0)
    assert set(gating(MODELS["uva_padova_t1d"])) == {"Qsto1", "Qgut", "X", "I1", "Id"}
    assert set(gating(MODELS["bergman_minimal"])) == {"G", "X", "I"}
    assert gating(MODELS["bergman_minimal"])["G"][1] == "-(p1 + X)"


def test_gating_rejects_branch_on_state():
    toy = Model(
        name="toy", description="", time_unit="1",
        states=[State("x", 1.0), State("v", 1.0), State("z", 1.0), State("w", 1.0)],
        parameters=[Parameter("kk", 1.0)],
        expressions=[("q", "2 * x"), ("r", "q + v")],
        derivatives={
            "x": "ifelse(x >= 1, -x, 1 - x)",  # same slope on both sides, but a jump: not affine
            "v": "-kk * v * v",
            "z": "kk * r - exp(w) * z + max(z, z + 1)",  # affine: max of two parallel lines
            "w": "kk * t",  # does not depend on w: b would be 0
        },
        outputs=[Output("o", "x")],
    )
    g = gating(toy)
    assert set(g) == {"z"}
    a, b = g["z"]
    assert a == "kk * r + 1"
    assert b == "-exp(w) + 1" or b == "1 - exp(w)"


# ============================================================================ (4) generated code
@pytest.mark.parametrize("name", sorted(MODELS))
def test_generated_expressions_are_valid_language_and_c(name):
    model = MODELS[name]
    known = {"t"} | set(model.state_names + model.parameter_names + model.input_names)
    known |= {n for n, _ in model.expressions}
    lines = []
    for extras, entries in (jacobian(model), time_derivative(model)):
        kn = set(known)
        for n, e in extras:
            check_expr(e, kn, f"{name}.{n}")
            assert n not in kn
            kn.add(n)
            lines.append((n, c_expr(e)))
        for k, e in entries.items():
            check_expr(e, kn, f"{name}.J{k}")
            lines.append((None, c_expr(e)))
    for x, (a, b) in gating(model).items():
        for e in (a, b):
            check_expr(e, known, f"{name}.gate.{x}")
            lines.append((None, c_expr(e)))
    if shutil.which("gcc") is None:
        return
    # the C must also compile: one function with all names in scope
    decl = [f"  const real {v} = 1.0;" for v in sorted(known)]
    body = [f"  const real {n} = {c};" if n else f"  s += {c};" for n, c in lines]
    src = "\n".join(["#define TWIN_FLOAT32 0", codegen_c.HEADER,
                     "real f(void) {", "  real s = 0;", *decl, *body, "  return s;", "}", ""])
    r = subprocess.run(["gcc", "-fsyntax-only", "-Wall", "-Werror", "-Wno-unused-variable", "-x", "c", "-"],
                       input=src, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr
