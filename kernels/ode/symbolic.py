"""Forward symbolic differentiation of the model expression language (kernels/ode/model.py).

Expressions are parsed into a small tuple tree, differentiated with the usual rules, simplified by
constant folding and identities (0*x -> 0, x*1 -> x, 0+x -> x, x-0 -> x, x/1 -> x, -(-x) -> x,
ifelse(c, a, a) -> a, numeric folding) and printed back in the SAME language, so the results pass
`check_expr` and go through the existing NumPy / C code generators unchanged.

  diff(expr, var, known)   derivative of one expression; `known` gives d(name)/d(var) for names that
                           depend on var indirectly (the model's intermediates).
  jacobian(model)          analytic df_i/dy_j through the ordered intermediates (extra intermediate
                           definitions + sparse entries).
  time_derivative(model)   explicit df_i/dt (inputs held constant), same shape with keys i.
  gating(model)            states whose derivative is affine in themselves, f = a + b*x (Rush-Larsen).
  substitute(expr, map)    simultaneous name -> expression substitution, simplified.
  simplify(expr)           the simplifier on its own.

Conventions: ifelse conditions are treated as locally constant (derivative of the taken branch);
abs, min and max differentiate to ifelse on the same comparison the NumPy/C backends use for ties
(abs: a >= 0, min: a <= b, max: a >= b). Powers with an exponent that does not depend on `var` use
n*a**(n-1)*da (valid for a <= 0); only a var-dependent exponent uses a**b*(db*log(a) + b*da/a).
"""

from __future__ import annotations

import ast
import math

__all__ = ["diff", "jacobian", "time_derivative", "gating", "substitute", "simplify", "names_in"]

# ----------------------------------------------------------------------------- tree
# ("num", float) ("name", str) ("neg", a) ("add"|"sub"|"mul"|"div"|"pow", a, b)
# ("call", fname, (args...)) for exp log sqrt tanh sin cos abs min max
# ("ifelse", ("cmp", op, l, r), a, b)
_UNARY_FUNCS = ("exp", "log", "sqrt", "tanh", "sin", "cos", "abs")
_BIN = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div", ast.Pow: "pow"}
_CMP = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_NARGS = {"ifelse": 3, "pow": 2, "min": 2, "max": 2}

ZERO = ("num", 0.0)
ONE = ("num", 1.0)


def _parse(expr: str) -> tuple:
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse {expr!r}: {e.msg}") from None
    return _from_ast(tree.body, expr)


def _from_ast(node: ast.AST, src: str) -> tuple:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return ("num", float(node.value))
        raise ValueError(f"constant {node.value!r} not allowed in {src!r}")
    if isinstance(node, ast.Name):
        return ("name", node.id)
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return ("neg", _from_ast(node.operand, src))
        if isinstance(node.op, ast.UAdd):
            return _from_ast(node.operand, src)
        raise ValueError(f"operator {type(node.op).__name__} not allowed in {src!r}")
    if isinstance(node, ast.BinOp):
        op = _BIN.get(type(node.op))
        if op is None:
            raise ValueError(f"operator {type(node.op).__name__} not allowed in {src!r}")
        return (op, _from_ast(node.left, src), _from_ast(node.right, src))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise ValueError(f"call of {ast.unparse(node.func)!r} not allowed in {src!r}")
        f = node.func.id
        if f not in _UNARY_FUNCS + ("pow", "min", "max", "ifelse"):
            raise ValueError(f"unknown function {f!r} in {src!r}")
        if node.keywords:
            raise ValueError(f"keyword arguments to {f!r} not allowed in {src!r}")
        want = _NARGS.get(f, 1)
        if len(node.args) != want:
            raise ValueError(f"{f} takes {want} argument(s) in {src!r}")
        if f == "ifelse":
            c = node.args[0]
            if not (isinstance(c, ast.Compare) and len(c.ops) == 1 and type(c.ops[0]) in _CMP):
                raise ValueError(f"the first argument of ifelse must be one comparison <, <=, >, >= in {src!r}")
            cond = ("cmp", _CMP[type(c.ops[0])], _from_ast(c.left, src), _from_ast(c.comparators[0], src))
            return ("ifelse", cond, _from_ast(node.args[1], src), _from_ast(node.args[2], src))
        args = tuple(_from_ast(a, src) for a in node.args)
        if f == "pow":
            return ("pow", args[0], args[1])
        return ("call", f, args)
    if isinstance(node, ast.Compare):
        raise ValueError(f"comparison outside ifelse not allowed in {src!r}")
    raise ValueError(f"{type(node).__name__} not allowed in {src!r}")


# ----------------------------------------------------------------------------- printing
_PREC = {"add": 1, "sub": 1, "mul": 2, "div": 2, "neg": 3, "pow": 4}


def _fmt_num(v: float) -> str:
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _prec(n: tuple) -> int:
    if n[0] == "num":
        return 3 if n[1] < 0 else 5
    return _PREC.get(n[0], 5)


def _wrap(n: tuple, need: int) -> str:
    s = _str(n)
    return s if _prec(n) >= need else f"({s})"


def _str(n: tuple) -> str:
    k = n[0]
    if k == "num":
        return _fmt_num(n[1])
    if k == "name":
        return n[1]
    if k == "neg":
        return "-" + _wrap(n[1], 4)
    if k in ("add", "sub"):
        return f"{_wrap(n[1], 1)} {'+' if k == 'add' else '-'} {_wrap(n[2], 2)}"
    if k in ("mul", "div"):
        return f"{_wrap(n[1], 2)} {'*' if k == 'mul' else '/'} {_wrap(n[2], 3)}"
    if k == "pow":
        return f"{_wrap(n[1], 5)} ** {_wrap(n[2], 3)}"
    if k == "call":
        return f"{n[1]}({', '.join(_str(a) for a in n[2])})"
    if k == "ifelse":
        _, op, l, r = n[1]
        return f"ifelse({_str(l)} {op} {_str(r)}, {_str(n[2])}, {_str(n[3])})"
    raise AssertionError(n)


# ----------------------------------------------------------------------------- smart constructors
def _num(v: float) -> tuple:
    return ("num", float(v)) if v != 0 else ZERO  # no -0.0


def _isnum(n: tuple, v: float | None = None) -> bool:
    return n[0] == "num" and (v is None or n[1] == v)


def _fold(fn, *vals) -> tuple | None:
    try:
        r = fn(*vals)
    except (ArithmeticError, ValueError):
        return None
    if isinstance(r, complex) or not math.isfinite(r):
        return None
    return _num(r)


def _neg(a: tuple) -> tuple:
    if a[0] == "num":
        return _num(-a[1])
    if a[0] == "neg":
        return a[1]
    return ("neg", a)


def _add(a: tuple, b: tuple) -> tuple:
    if _isnum(a) and _isnum(b):
        return _num(a[1] + b[1])
    if _isnum(a, 0):
        return b
    if _isnum(b, 0):
        return a
    if b[0] == "neg":
        return _sub(a, b[1])
    if _isnum(b) and b[1] < 0:
        return _sub(a, _num(-b[1]))
    if a[0] == "neg":
        return _sub(b, a[1])
    return ("add", a, b)


def _sub(a: tuple, b: tuple) -> tuple:
    if _isnum(a) and _isnum(b):
        return _num(a[1] - b[1])
    if _isnum(b, 0):
        return a
    if _isnum(a, 0):
        return _neg(b)
    if a == b:
        return ZERO
    if b[0] == "neg":
        return _add(a, b[1])
    if _isnum(b) and b[1] < 0:
        return _add(a, _num(-b[1]))
    return ("sub", a, b)


def _mul(a: tuple, b: tuple) -> tuple:
    if _isnum(a) and _isnum(b):
        return _num(a[1] * b[1])
    if _isnum(a, 0) or _isnum(b, 0):
        return ZERO
    if _isnum(a, 1):
        return b
    if _isnum(b, 1):
        return a
    if a[0] == "neg":
        return _neg(_mul(a[1], b))
    if b[0] == "neg":
        return _neg(_mul(a, b[1]))
    if _isnum(a) and a[1] < 0:
        return _neg(_mul(_num(-a[1]), b))
    if _isnum(b) and b[1] < 0:
        return _neg(_mul(a, _num(-b[1])))
    if _isnum(b):  # numeric coefficient first
        return _mul(b, a)
    if _isnum(a) and b[0] == "mul" and _isnum(b[1]):
        return _mul(_num(a[1] * b[1][1]), b[2])
    return ("mul", a, b)


def _div(a: tuple, b: tuple) -> tuple:
    if _isnum(a) and _isnum(b):
        r = _fold(lambda x, y: x / y, a[1], b[1])
        if r is not None:
            return r
    if _isnum(a, 0) and not _isnum(b, 0):
        return ZERO
    if _isnum(b, 1):
        return a
    if a[0] == "neg":
        return _neg(_div(a[1], b))
    if b[0] == "neg":
        return _neg(_div(a, b[1]))
    if _isnum(a) and a[1] < 0:
        return _neg(_div(_num(-a[1]), b))
    if _isnum(b) and b[1] < 0:
        return _neg(_div(a, _num(-b[1])))
    return ("div", a, b)


def _pow(a: tuple, b: tuple) -> tuple:
    if _isnum(b, 0) or _isnum(a, 1):
        return ONE
    if _isnum(b, 1):
        return a
    if _isnum(a) and _isnum(b):
        r = _fold(lambda x, y: x ** y, a[1], b[1])
        if r is not None:
            return r
    return ("pow", a, b)


_MATH = {"exp": math.exp, "log": math.log, "sqrt": math.sqrt, "tanh": math.tanh, "sin": math.sin,
         "cos": math.cos, "abs": abs, "min": min, "max": max}


def _call(f: str, args: tuple) -> tuple:
    if all(_isnum(a) for a in args):
        r = _fold(_MATH[f], *(a[1] for a in args))
        if r is not None:
            return r
    return ("call", f, tuple(args))


_CMPFN = {"<": lambda x, y: x < y, "<=": lambda x, y: x <= y, ">": lambda x, y: x > y, ">=": lambda x, y: x >= y}


def _ifelse(c: tuple, a: tuple, b: tuple) -> tuple:
    if a == b:
        return a
    _, op, l, r = c
    if _isnum(l) and _isnum(r):
        return a if _CMPFN[op](l[1], r[1]) else b
    return ("ifelse", c, a, b)


def _simplify(n: tuple) -> tuple:
    k = n[0]
    if k in ("num", "name"):
        return n
    if k == "neg":
        return _neg(_simplify(n[1]))
    if k in ("add", "sub", "mul", "div", "pow"):
        return _OPS[k](_simplify(n[1]), _simplify(n[2]))
    if k == "call":
        return _call(n[1], tuple(_simplify(a) for a in n[2]))
    if k == "ifelse":
        _, op, l, r = n[1]
        return _ifelse(("cmp", op, _simplify(l), _simplify(r)), _simplify(n[2]), _simplify(n[3]))
    raise AssertionError(n)


_OPS = {"add": _add, "sub": _sub, "mul": _mul, "div": _div, "pow": _pow}


# ----------------------------------------------------------------------------- helpers on trees
def _names(n: tuple, out: set | None = None) -> set:
    out = set() if out is None else out
    k = n[0]
    if k == "name":
        out.add(n[1])
    elif k == "num":
        pass
    elif k == "neg":
        _names(n[1], out)
    elif k in _OPS:
        _names(n[1], out)
        _names(n[2], out)
    elif k == "call":
        for a in n[2]:
            _names(a, out)
    elif k == "ifelse":
        _names(n[1][2], out)
        _names(n[1][3], out)
        _names(n[2], out)
        _names(n[3], out)
    return out


def _cond_names(n: tuple, out: set | None = None) -> set:
    """Names that appear inside ifelse comparisons."""
    out = set() if out is None else out
    k = n[0]
    if k == "neg":
        _cond_names(n[1], out)
    elif k in _OPS:
        _cond_names(n[1], out)
        _cond_names(n[2], out)
    elif k == "call":
        for a in n[2]:
            _cond_names(a, out)
    elif k == "ifelse":
        _names(n[1][2], out)
        _names(n[1][3], out)
        for x in (n[1][2], n[1][3], n[2], n[3]):
            _cond_names(x, out)
    return out


def _subst(n: tuple, m: dict) -> tuple:
    """Simultaneous substitution of names (no simplification)."""
    k = n[0]
    if k == "name":
        return m.get(n[1], n)
    if k == "num":
        return n
    if k == "neg":
        return ("neg", _subst(n[1], m))
    if k in _OPS:
        return (k, _subst(n[1], m), _subst(n[2], m))
    if k == "call":
        return ("call", n[1], tuple(_subst(a, m) for a in n[2]))
    if k == "ifelse":
        _, op, l, r = n[1]
        return ("ifelse", ("cmp", op, _subst(l, m), _subst(r, m)), _subst(n[2], m), _subst(n[3], m))
    raise AssertionError(n)


# ----------------------------------------------------------------------------- differentiation
def _d(n: tuple, var: str, known: dict) -> tuple:
    k = n[0]
    if k == "num":
        return ZERO
    if k == "name":
        if n[1] == var:
            return ONE
        return known.get(n[1], ZERO)
    if k == "neg":
        return _neg(_d(n[1], var, known))
    if k == "add":
        return _add(_d(n[1], var, known), _d(n[2], var, known))
    if k == "sub":
        return _sub(_d(n[1], var, known), _d(n[2], var, known))
    if k == "mul":
        a, b = n[1], n[2]
        return _add(_mul(_d(a, var, known), b), _mul(a, _d(b, var, known)))
    if k == "div":
        a, b = n[1], n[2]
        da, db = _d(a, var, known), _d(b, var, known)
        if _isnum(db, 0):
            return _div(da, b)
        return _div(_sub(_mul(da, b), _mul(a, db)), _pow(b, _num(2)))
    if k == "pow":
        a, b = n[1], n[2]
        da, db = _d(a, var, known), _d(b, var, known)
        if _isnum(db, 0):  # exponent constant w.r.t. var: valid for any sign of a
            if _isnum(da, 0):
                return ZERO
            nm1 = _num(b[1] - 1) if _isnum(b) else _sub(b, ONE)
            return _mul(_mul(b, _pow(a, nm1)), da)
        # general: d(a**b) = a**b * (db*log(a) + b*da/a)   (needs a > 0)
        return _mul(n, _add(_mul(db, _call("log", (a,))), _div(_mul(b, da), a)))
    if k == "call":
        f, args = n[1], n[2]
        if f in ("min", "max"):
            a, b = args
            da, db = _d(a, var, known), _d(b, var, known)
            return _ifelse(("cmp", "<=" if f == "min" else ">=", a, b), da, db)
        a = args[0]
        da = _d(a, var, known)
        if _isnum(da, 0):
            return ZERO
        if f == "exp":
            return _mul(n, da)
        if f == "log":
            return _div(da, a)
        if f == "sqrt":
            return _div(da, _mul(_num(2), n))
        if f == "tanh":
            return _mul(_sub(ONE, _pow(n, _num(2))), da)
        if f == "sin":
            return _mul(_call("cos", (a,)), da)
        if f == "cos":
            return _neg(_mul(_call("sin", (a,)), da))
        if f == "abs":
            return _ifelse(("cmp", ">=", a, ZERO), da, _neg(da))
        raise ValueError(f"cannot differentiate function {f!r}")
    if k == "ifelse":
        return _ifelse(n[1], _d(n[2], var, known), _d(n[3], var, known))
    raise ValueError(f"cannot differentiate {k!r}")


# ----------------------------------------------------------------------------- public API
def diff(expr: str, var: str, known: dict[str, str] | None = None) -> str:
    """d(expr)/d(var) as an expression string; "0" when identically zero.

    `known` maps other names to their derivatives w.r.t. var (e.g. intermediates); names not in it
    (and not var) are constants."""
    kn = {k: _simplify(_parse(v)) for k, v in (known or {}).items()}
    return _str(_d(_parse(expr), var, kn))


def simplify(expr: str) -> str:
    return _str(_simplify(_parse(expr)))


def substitute(expr: str, mapping: dict[str, str]) -> str:
    """Replace names by expressions (simultaneously), then simplify."""
    m = {k: _parse(v) for k, v in mapping.items()}
    return _str(_simplify(_subst(_parse(expr), m)))


def names_in(expr: str) -> set[str]:
    """Names an expression refers to (functions excluded)."""
    return _names(_parse(expr))


def _dname(inter: str, var: str) -> str:
    return f"_d_{inter}__{var}"


def _chain(model, var: str, taken: set[str], extras: list, by_expr: dict) -> dict:
    """d(intermediate)/d(var) for every intermediate that depends on var; non-atomic ones become
    extra definitions (deduplicated by text), atomic ones (numbers, names) are inlined."""
    known: dict[str, tuple] = {}
    for name, e in model.expressions:
        d = _d(_parse(e), var, known)
        if _isnum(d, 0):
            continue
        if d[0] in ("num", "name") or (d[0] == "neg" and d[1][0] in ("num", "name")):
            known[name] = d
            continue
        text = _str(d)
        if text not in by_expr:
            nm = _dname(name, var)
            while nm in taken:
                nm += "_"
            taken.add(nm)
            extras.append((nm, text))
            by_expr[text] = nm
        known[name] = ("name", by_expr[text])
    return known


def _prune(extras: list, entries: dict) -> list:
    defs = dict(extras)
    need: set[str] = set()
    stack = [nm for e in entries.values() for nm in names_in(e) if nm in defs]
    while stack:
        nm = stack.pop()
        if nm in need:
            continue
        need.add(nm)
        stack += [x for x in names_in(defs[nm]) if x in defs and x not in need]
    return [(n, e) for n, e in extras if n in need]


def _model_names(model) -> set[str]:
    return ({"t"} | set(model.state_names) | set(model.parameter_names) | set(model.input_names)
            | {n for n, _ in model.expressions})


def jacobian(model) -> tuple[list[tuple[str, str]], dict[tuple[int, int], str]]:
    """Analytic Jacobian J[i, j] = d f_i / d y_j.

    Returns (extras, entries): `extras` are ordered (name, expr) definitions to evaluate AFTER the
    model's own intermediates (they may reference them and earlier extras); `entries` is a sparse
    {(i, j): expr} of the structurally non-zero entries, referencing model names and extras."""
    taken = _model_names(model)
    extras: list = []
    by_expr: dict = {}
    entries: dict[tuple[int, int], str] = {}
    fs = [_parse(model.derivatives[s]) for s in model.state_names]
    for j, yj in enumerate(model.state_names):
        known = _chain(model, yj, taken, extras, by_expr)
        for i, f in enumerate(fs):
            d = _d(f, yj, known)
            if not _isnum(d, 0):
                entries[(i, j)] = _str(d)
    return _prune(extras, entries), entries


def time_derivative(model) -> tuple[list[tuple[str, str]], dict[int, str]]:
    """Explicit time derivative d f_i / d t (states and inputs held constant): (extras, {i: expr})."""
    taken = _model_names(model)
    extras: list = []
    known = _chain(model, "t", taken, extras, {})
    entries: dict[int, str] = {}
    for i, s in enumerate(model.state_names):
        d = _d(_parse(model.derivatives[s]), "t", known)
        if not _isnum(d, 0):
            entries[i] = _str(d)
    return _prune(extras, entries), entries


def gating(model) -> dict[str, tuple[str, str]]:
    """States x whose derivative is affine in x: {x: (a, b)} with f = a + b*x exactly.

    a and b do not depend on x; they may reference the model's intermediates that do not depend on
    x (intermediates that do are inlined). A state is reported only if b is not identically 0, b
    (after simplification) does not contain x, and x appears in no ifelse comparison of f (a branch
    switch on x would make f only piecewise affine). Rush-Larsen step with a, b frozen:
    x(t+h) = -a/b + (x + a/b) * exp(b*h)."""
    exprs = [(n, _parse(e)) for n, e in model.expressions]
    out: dict[str, tuple[str, str]] = {}
    for x in model.state_names:
        inline: dict[str, tuple] = {}  # intermediates depending on x, fully expanded
        for n, e in exprs:
            if _names(e) & ({x} | set(inline)):
                inline[n] = _subst(e, inline)
        f = _subst(_parse(model.derivatives[x]), inline)
        if x not in _names(f) or x in _cond_names(f):
            continue
        b = _d(f, x, {})
        if _isnum(b, 0) or x in _names(b) or not _isnum(_d(b, x, {}), 0):
            continue
        a = _simplify(_subst(f, {x: ZERO}))
        out[x] = (_str(a), _str(b))
    return out
