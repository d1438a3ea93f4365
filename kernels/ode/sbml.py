"""Import an SBML model (deterministic ODE subset) as a `Model` declaration.

`import_sbml(path_or_xml)` reads SBML Level 1-3 with python-libsbml and translates it into the
same declaration the model library uses, so every backend runs it unchanged:

* compartments and global parameters with a fixed value become `Parameter`s (not constrained to
  be positive: SBML does not say);
* local kinetic-law parameters become global parameters renamed ``<reaction>_<id>``;
* species become states holding the value their symbol has in SBML math: a concentration
  (amount / compartment size) unless hasOnlySubstanceUnits is set or the compartment is
  zero-dimensional (before L3, or without a size), in which case an amount. Reactions contribute
  ``conversionFactor * sum(stoichiometry * rate)`` to the amount, divided by the compartment
  size for concentration states; boundary and constant species are not changed by reactions.
  In a compartment whose size a rule changes, such a species' state is its amount
  (``<id>_amt``) and its symbol the intermediate amount / size;
* reaction rates (kinetic laws, named after the reaction id) and assignment-rule targets become
  ordered intermediate expressions (topologically sorted; a cycle is refused);
* rate-rule targets become states; species-reference ids (L3), stoichiometryMath and conversion
  factors are supported; ``rateOf(x)`` becomes an intermediate equal to x's derivative (0 for
  constants); rules or initial assignments without math are ignored (L3V2);
* initial values: initial assignments, assignment rules and initial amounts/concentrations are
  combined into per-state `init` expressions written in parameters only (initial values of other
  symbols are substituted in), so changing a parameter changes every initial value derived from
  it; symbols fixed by an initial assignment become intermediates in parameters;
* function definitions are inlined; MathML is translated node by node from libsbml's AST into
  the checked expression language (`formulaToL3String` is used for messages only). Piecewise
  becomes nested ``ifelse``; conditions built from and/or/not/xor, ==, != and chained relations
  are rewritten into nested single comparisons; booleans read as numbers are 1/0 and numbers read
  as booleans are "!= 0" (L3V2). Functions outside the language (tan, sinh, sec, log base b,
  root n, min/max of n arguments, ...) are rewritten from exp/log/sin/cos/tanh when exact.

Outputs: ``<species>_amount`` and ``<species>_conc`` for every species (only ``_amount`` in
zero-dimensional compartments), and every other symbol (parameter, compartment, reaction rate,
species reference) by its own name.

Anything outside this subset raises `ValueError("unsupported SBML feature: <feature> (detail)")`
(events, algebraic rules, delays, fast reactions, required SBML packages such as comp, rateOf of
assigned variables, undefined values, infinities, MathML functions with no exact rewrite such as
arccos, floor, factorial, rem), so callers can skip a model honestly. Invalid SBML raises
`ValueError("invalid SBML: ...")`.

`import_sbml_mapped` also returns the map from SBML ids to model names and outputs
(`SbmlImport.output_for(id, "amount" | "concentration")`).
"""

from __future__ import annotations

import ast
import copy
import keyword
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import model as _model_mod
from .model import CONSTANTS, FUNCTIONS, Model, Output, Parameter, State, check_expr

try:  # optional dependency: only this importer needs it
    import libsbml
except ImportError:  # pragma: no cover - exercised only without libsbml
    libsbml = None

AVOGADRO = 6.02214179e23  # value fixed by the SBML L3 specification
# names the generated code uses itself, or that the expression language reserves
_RESERVED = (set(keyword.kwlist) | set(FUNCTIONS) | set(CONSTANTS) | {"t", "y", "p", "u", "dy", "np", "time"}
             | set(getattr(_model_mod, "RESERVED", ())))
_RESERVED_PREFIXES = ("TWIN_", "_twin")

# packages that never change the dynamics (l3v2extendedmath's functions are handled as math)
_HARMLESS_PACKAGES = {"l3v2extendedmath", "layout", "render", "groups", "fbc"}

__all__ = ["import_sbml", "import_sbml_mapped", "SbmlImport", "AVOGADRO"]


def _unsupported(feature: str, detail: str = "") -> ValueError:
    return ValueError(f"unsupported SBML feature: {feature}" + (f" ({detail})" if detail else ""))


_SIZELESS = "<no size>"  # scope entry of a zero-dimensional compartment without size


# ------------------------------------------------------------------------------------------- math
@dataclass
class _Cond:
    """A boolean condition tree: ('cmp', op, a, b) | ('and', [..]) | ('or', [..]) | ('not', c) | ('const', bool)."""

    kind: str
    args: tuple


def _num(x: float) -> str:
    if math.isnan(x):
        raise _unsupported("NaN constant")
    if math.isinf(x):
        raise _unsupported("infinite constant")
    return f"({float(x)!r})"


class _MathTranslator:
    """libsbml ASTNode -> expression-language string with fully parenthesised sub-expressions."""

    def __init__(self, functions: dict, where: str, rate_of=None):
        self.functions = functions  # id -> (argument names, body ASTNode)
        self.where = where
        self.rate_of = rate_of  # rate_of(our name of the symbol) -> expression of its rate of change

    def expr(self, node, scope: dict[str, str], env: dict[str, str] | None = None, depth: int = 0) -> str:
        if depth > 200:
            raise _unsupported("recursive function definitions", self.where)
        env = env or {}
        L = libsbml
        t = node.getType()
        n = node.getNumChildren()
        ch = [node.getChild(i) for i in range(n)]

        def e(c):
            return self.expr(c, scope, env, depth + 1)

        if t == L.AST_INTEGER:
            return _num(node.getInteger())
        if t in (L.AST_REAL, L.AST_REAL_E, L.AST_RATIONAL):
            return _num(node.getReal())
        if t == L.AST_NAME:
            name = node.getName()
            if name in env:
                return env[name]
            if name in scope:
                if scope[name] is _SIZELESS:
                    raise _unsupported("undefined value", f"{self.where}: 0-D compartment {name!r} has no size")
                return scope[name]
            raise ValueError(f"{self.where}: unknown SBML symbol {name!r}")
        if t == L.AST_NAME_TIME:
            return "t"
        if t == L.AST_NAME_AVOGADRO:
            return _num(AVOGADRO)
        if t == L.AST_CONSTANT_PI:
            return "pi"
        if t == L.AST_CONSTANT_E:
            return "exp(1.0)"
        if t in (L.AST_CONSTANT_TRUE, L.AST_CONSTANT_FALSE) or self._is_boolean(node):
            # a boolean read as a number is 1 or 0 (SBML L3V2)
            return self._branch(self._cond(node, scope, env, depth + 1), "(1.0)", "(0.0)")
        if t == L.AST_PLUS:
            return "(" + " + ".join(e(c) for c in ch) + ")" if n else "(0.0)"
        if t == L.AST_TIMES:
            return "(" + " * ".join(e(c) for c in ch) + ")" if n else "(1.0)"
        if t == L.AST_MINUS:
            if n == 1:
                return f"(-{e(ch[0])})"
            return f"({e(ch[0])} - {e(ch[1])})"
        if t == L.AST_DIVIDE:
            return f"({e(ch[0])} / {e(ch[1])})"
        if t in (L.AST_POWER, L.AST_FUNCTION_POWER):
            return f"({e(ch[0])} ** {e(ch[1])})"
        simple = {L.AST_FUNCTION_ABS: "abs", L.AST_FUNCTION_EXP: "exp", L.AST_FUNCTION_LN: "log",
                  L.AST_FUNCTION_SIN: "sin", L.AST_FUNCTION_COS: "cos", L.AST_FUNCTION_TANH: "tanh"}
        if t in simple and n == 1:
            return f"{simple[t]}({e(ch[0])})"
        if t == L.AST_FUNCTION_LOG:
            # libsbml: log with one child is log10; with two, the first is the base
            if n == 1:
                return f"(log({e(ch[0])}) / log(10.0))"
            return f"(log({e(ch[1])}) / log({e(ch[0])}))"
        if t == L.AST_FUNCTION_ROOT:
            if n == 1:
                return f"sqrt({e(ch[0])})"
            return f"({e(ch[1])} ** (1.0 / {e(ch[0])}))"
        if t in (L.AST_FUNCTION_TAN, L.AST_FUNCTION_SEC, L.AST_FUNCTION_CSC, L.AST_FUNCTION_COT,
                 L.AST_FUNCTION_SINH, L.AST_FUNCTION_COSH, L.AST_FUNCTION_SECH, L.AST_FUNCTION_CSCH,
                 L.AST_FUNCTION_COTH) and n == 1:
            x = e(ch[0])
            return {
                L.AST_FUNCTION_TAN: f"(sin({x}) / cos({x}))",
                L.AST_FUNCTION_SEC: f"(1.0 / cos({x}))",
                L.AST_FUNCTION_CSC: f"(1.0 / sin({x}))",
                L.AST_FUNCTION_COT: f"(cos({x}) / sin({x}))",
                L.AST_FUNCTION_SINH: f"((exp({x}) - exp(-{x})) / 2.0)",
                L.AST_FUNCTION_COSH: f"((exp({x}) + exp(-{x})) / 2.0)",
                L.AST_FUNCTION_SECH: f"(2.0 / (exp({x}) + exp(-{x})))",
                L.AST_FUNCTION_CSCH: f"(2.0 / (exp({x}) - exp(-{x})))",
                L.AST_FUNCTION_COTH: f"(1.0 / tanh({x}))",
            }[t]
        if t in (L.AST_FUNCTION_MAX, L.AST_FUNCTION_MIN) and n >= 1:
            f = "max" if t == L.AST_FUNCTION_MAX else "min"
            out = e(ch[0])
            for c in ch[1:]:
                out = f"{f}({out}, {e(c)})"
            return out
        if t == L.AST_FUNCTION_PIECEWISE:
            pieces = [(ch[i], ch[i + 1]) for i in range(0, n - 1, 2)]
            if n % 2 == 1:
                other = e(ch[-1])
            else:
                raise _unsupported("piecewise without an otherwise branch", f"{self.where}: {self._formula(node)}")
            out = other
            for val, cond in reversed(pieces):
                out = self._branch(self._cond(cond, scope, env, depth + 1), e(val), out)
            return out
        if t == L.AST_FUNCTION:
            fid = node.getName()
            if fid not in self.functions:
                raise ValueError(f"{self.where}: call of unknown function {fid!r}")
            args, body = self.functions[fid]
            if body is None:
                raise _unsupported("function definition without math", f"{self.where}: {fid}")
            if len(args) != n:
                raise ValueError(f"{self.where}: function {fid!r} takes {len(args)} argument(s), got {n}")
            inner = {a: e(c) for a, c in zip(args, ch)}
            return self.expr(body, scope, inner, depth + 1)
        if t == L.AST_FUNCTION_DELAY:
            raise _unsupported("delay", self.where)
        if t == L.AST_FUNCTION_RATE_OF:
            if n != 1 or ch[0].getType() != L.AST_NAME or ch[0].getName() in env or self.rate_of is None:
                raise _unsupported("rateOf of an expression", f"{self.where}: {self._formula(node)}")
            return self.rate_of(e(ch[0]), self.where)
        if t == L.AST_CSYMBOL_FUNCTION or t == L.AST_FUNCTION_DELAY:
            raise _unsupported("csymbol function", self.where)
        label = node.getName() or libsbml.formulaToL3String(node)
        raise _unsupported(f"MathML function {label!r}", self.where)

    # ---- booleans
    @staticmethod
    def _is_boolean(node) -> bool:
        L = libsbml
        return node.getType() in (
            L.AST_RELATIONAL_EQ, L.AST_RELATIONAL_NEQ, L.AST_RELATIONAL_LT, L.AST_RELATIONAL_LEQ,
            L.AST_RELATIONAL_GT, L.AST_RELATIONAL_GEQ, L.AST_LOGICAL_AND, L.AST_LOGICAL_OR,
            L.AST_LOGICAL_NOT, L.AST_LOGICAL_XOR, L.AST_LOGICAL_IMPLIES)

    @staticmethod
    def _formula(node) -> str:
        try:
            return libsbml.formulaToL3String(node)
        except Exception:  # pragma: no cover
            return "?"

    def _cond(self, node, scope, env, depth) -> _Cond:
        L = libsbml
        t = node.getType()
        n = node.getNumChildren()
        ch = [node.getChild(i) for i in range(n)]
        if t == L.AST_CONSTANT_TRUE:
            return _Cond("const", (True,))
        if t == L.AST_CONSTANT_FALSE:
            return _Cond("const", (False,))
        ops = {L.AST_RELATIONAL_LT: "<", L.AST_RELATIONAL_LEQ: "<=", L.AST_RELATIONAL_GT: ">",
               L.AST_RELATIONAL_GEQ: ">=", L.AST_RELATIONAL_EQ: "==", L.AST_RELATIONAL_NEQ: "!="}
        if t in ops:
            if n < 2:
                raise _unsupported("relation with fewer than two arguments", self.where)
            xs = [self.expr(c, scope, env, depth + 1) for c in ch]
            parts = [_Cond("cmp", (ops[t], xs[i], xs[i + 1])) for i in range(n - 1)]
            if ops[t] == "!=":
                if n != 2:
                    raise _unsupported("neq with more than two arguments", self.where)
                return parts[0]
            return parts[0] if len(parts) == 1 else _Cond("and", tuple(parts))
        if t == L.AST_LOGICAL_AND:
            if not n:
                return _Cond("const", (True,))
            return _Cond("and", tuple(self._cond(c, scope, env, depth + 1) for c in ch))
        if t == L.AST_LOGICAL_OR:
            if not n:
                return _Cond("const", (False,))
            return _Cond("or", tuple(self._cond(c, scope, env, depth + 1) for c in ch))
        if t == L.AST_LOGICAL_NOT and n == 1:
            return _Cond("not", (self._cond(ch[0], scope, env, depth + 1),))
        if t == L.AST_LOGICAL_XOR:
            cs = [self._cond(c, scope, env, depth + 1) for c in ch]
            out = _Cond("const", (False,))
            for c in cs:  # a xor b = (a and not b) or (not a and b)
                out = _Cond("or", (_Cond("and", (out, _Cond("not", (c,)))), _Cond("and", (_Cond("not", (out,)), c))))
            return out
        if t == L.AST_LOGICAL_IMPLIES and n == 2:
            a, b = (self._cond(c, scope, env, depth + 1) for c in ch)
            return _Cond("or", (_Cond("not", (a,)), b))
        if t == L.AST_FUNCTION:
            fid = node.getName()
            if fid in self.functions:
                args, body = self.functions[fid]
                if len(args) == n and body is not None:
                    inner = {a: self.expr(c, scope, env, depth + 1) for a, c in zip(args, ch)}
                    return self._cond(body, scope, inner, depth + 1)
        if t == L.AST_FUNCTION_PIECEWISE:  # piecewise with boolean pieces: a decision tree of conditions
            if n % 2 == 0:
                raise _unsupported("piecewise without an otherwise branch", f"{self.where}: {self._formula(node)}")
            out = self._cond(ch[-1], scope, env, depth + 1)
            for i in reversed(range(0, n - 1, 2)):
                c = self._cond(ch[i + 1], scope, env, depth + 1)
                v = self._cond(ch[i], scope, env, depth + 1)
                out = _Cond("or", (_Cond("and", (c, v)), _Cond("and", (_Cond("not", (c,)), out))))
            return out
        # a number read as a boolean is true when non-zero (SBML L3V2)
        return _Cond("cmp", ("!=", self.expr(node, scope, env, depth + 1), "(0.0)"))

    def _branch(self, c: _Cond, a: str, b: str) -> str:
        """Expression equal to a where condition c holds, else b, built from single comparisons."""
        if c.kind == "const":
            return a if c.args[0] else b
        if c.kind == "not":
            return self._branch(c.args[0], b, a)
        if c.kind == "and":
            out = a
            for sub in reversed(c.args):
                out = self._branch(sub, out, b)
            return out
        if c.kind == "or":
            out = b
            for sub in reversed(c.args):
                out = self._branch(sub, a, out)
            return out
        op, x, y = c.args
        if op in ("<", "<=", ">", ">="):
            return f"ifelse({x} {op} {y}, {a}, {b})"
        if op == "==":  # x == y  <=>  not (x < y) and not (x > y)
            return f"ifelse({x} < {y}, {b}, ifelse({x} > {y}, {b}, {a}))"
        if op == "!=":
            return f"ifelse({x} < {y}, {a}, ifelse({x} > {y}, {a}, {b}))"
        raise AssertionError(op)


# -------------------------------------------------------------------------------------- helpers
def _names_in(tree: ast.AST) -> set[str]:
    calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in calls and n.id not in CONSTANTS}


class _Subst(ast.NodeTransformer):
    def __init__(self, repl):
        self.repl = repl  # name -> ast expr or None (keep)

    def visit_Call(self, node: ast.Call):
        node.args = [self.visit(a) for a in node.args]
        return node

    def visit_Name(self, node: ast.Name):
        if node.id in CONSTANTS:
            return node
        r = self.repl(node.id)
        return node if r is None else copy.deepcopy(r)


def _fold(tree: ast.Expression) -> str | float:
    """A float when the expression has no free names, else its source."""
    if not _names_in(tree):
        from .codegen_numpy import to_numpy_expr

        src = ast.unparse(tree)
        check_expr(src, set(), "initial value")
        with np.errstate(all="ignore"):
            val = eval(compile(to_numpy_expr(src), "<sbml init>", "eval"), {"np": np})  # checked above
        return float(val)
    return ast.unparse(tree)


def _safe_name(sid: str, taken: set[str]) -> str:
    name = sid if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", sid) else re.sub(r"\W", "_", sid)
    if not re.match(r"[A-Za-z_]", name) or name.startswith(_RESERVED_PREFIXES):
        name = "s_" + name
    while name in _RESERVED or name in taken:
        name += "_"
    taken.add(name)
    return name


def _read(source) -> "libsbml.SBMLDocument":
    if libsbml is None:
        raise ImportError("import_sbml needs python-libsbml (pip install python-libsbml)")
    if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith("<")):
        text = Path(source).read_text()
    else:
        text = source
    doc = libsbml.readSBMLFromString(text)
    errs = [doc.getError(i) for i in range(doc.getNumErrors())]
    bad = [e for e in errs if e.getSeverity() in (libsbml.LIBSBML_SEV_ERROR, libsbml.LIBSBML_SEV_FATAL)]
    if bad or doc.getModel() is None:
        msg = "; ".join(f"line {e.getLine()}: {e.getShortMessage()}" for e in bad[:3]) or "no model"
        raise ValueError(f"invalid SBML: {msg}")
    return doc


# --------------------------------------------------------------------------------------- import
@dataclass
class SbmlImport:
    """An imported model with the map from SBML ids to the names used in the declaration."""

    model: Model
    names: dict[str, str]  # SBML id -> state / parameter / expression name
    amount_outputs: dict[str, str]  # species id -> output giving its amount
    concentration_outputs: dict[str, str]  # species id -> output giving its concentration

    def output_for(self, sid: str, unit: str = "") -> str:
        """Observable name for an SBML id; unit "amount" or "concentration" for species."""
        if sid in self.amount_outputs and unit != "concentration":
            if unit == "amount" or sid not in self.concentration_outputs:
                return self.amount_outputs[sid]
        if sid in self.concentration_outputs:
            return self.concentration_outputs[sid]
        return self.names[sid]


def import_sbml(source: str | os.PathLike, *, name: str | None = None) -> Model:
    """Translate an SBML document (a path, or the XML text itself) into a `Model`.

    Raises ValueError naming the feature when the model is outside the supported ODE subset.
    """
    return import_sbml_mapped(source, name=name).model


def import_sbml_mapped(source: str | os.PathLike, *, name: str | None = None) -> SbmlImport:
    """Like `import_sbml`, also returning how SBML ids map onto model names and outputs."""
    doc = _read(source)
    m = doc.getModel()
    where_model = m.getId() or "model"

    # ---- refuse what we cannot represent
    for i in range(doc.getNumPlugins()):
        pkg = doc.getPlugin(i).getPackageName()
        # packages that change the meaning of the model declare themselves required (comp, distrib,
        # arrays, multi, spatial, ...); layout, render, groups, fbc annotations do not
        if pkg and pkg not in _HARMLESS_PACKAGES and doc.isPackageEnabled(pkg) and doc.getPackageRequired(pkg):
            raise _unsupported(f"SBML package {pkg!r}")
    if m.getNumEvents():
        raise _unsupported("events", f"{m.getNumEvents()} event(s)")
    for r in m.getListOfRules():
        if r.isAlgebraic():
            raise _unsupported("algebraic rules")
    for r in m.getListOfReactions():
        if r.isSetFast() and r.getFast():
            raise _unsupported("fast reactions", r.getId())

    # ---- functions and symbols
    functions = {}
    for fd in m.getListOfFunctionDefinitions():
        if fd.getMath() is None or fd.getBody() is None:  # an error only if it is called
            functions[fd.getId()] = ([], None)
            continue
        functions[fd.getId()] = ([fd.getArgument(i).getName() for i in range(fd.getNumArguments())], fd.getBody())

    taken: set[str] = set()
    scope: dict[str, str] = {}  # SBML id -> our name
    kind: dict[str, str] = {}  # SBML id -> compartment | species | parameter | reaction | specref
    order: list[str] = []

    def add(sid: str, k: str):
        if sid in scope:
            raise ValueError(f"duplicate SBML id {sid!r}")
        scope[sid] = _safe_name(sid, taken)
        kind[sid] = k
        order.append(sid)

    for c in m.getListOfCompartments():
        add(c.getId(), "compartment")
    for s in m.getListOfSpecies():
        add(s.getId(), "species")
    for p in m.getListOfParameters():
        add(p.getId(), "parameter")
    for r in m.getListOfReactions():
        add(r.getId(), "reaction")
    specrefs = {}
    for r in m.getListOfReactions():
        for lst in (r.getListOfReactants(), r.getListOfProducts()):
            for sr in lst:
                if m.getLevel() >= 3 and sr.isSetId() and sr.getId():  # symbols in math from L3 on
                    add(sr.getId(), "specref")
                    specrefs[sr.getId()] = sr

    # a rule or initial assignment without math has no effect (SBML L3V2)
    assign = {r.getVariable(): r for r in m.getListOfRules() if r.isAssignment() and r.isSetMath()}
    rate = {r.getVariable(): r for r in m.getListOfRules() if r.isRate() and r.isSetMath()}
    initial = {ia.getSymbol(): ia for ia in m.getListOfInitialAssignments() if ia.isSetMath()}
    for v in list(assign) + list(rate) + list(initial):
        if v not in scope:
            raise ValueError(f"rule or initial assignment for unknown symbol {v!r}")
        if kind[v] == "reaction":
            raise ValueError(f"rule or initial assignment targets reaction {v!r}")

    comps = {c.getId(): c for c in m.getListOfCompartments()}
    species = {s.getId(): s for s in m.getListOfSpecies()}
    params = {p.getId(): p for p in m.getListOfParameters()}

    def dims(cid: str) -> float:
        c = comps[cid]
        if m.getLevel() >= 3:
            return c.getSpatialDimensionsAsDouble() if c.isSetSpatialDimensions() else 3.0
        return float(c.getSpatialDimensions())

    def amount_only(cid: str) -> bool:
        """Species symbols in this compartment are amounts: 0-D compartments before L3, or without size."""
        c = comps[cid]
        has_size = c.isSetSize() or cid in initial or cid in assign or cid in rate
        return dims(cid) == 0 and (m.getLevel() < 3 or not has_size)

    def is_conc(sid: str) -> bool:
        s = species[sid]
        return not s.getHasOnlySubstanceUnits() and not amount_only(s.getCompartment())

    for sid, s in species.items():
        cid = s.getCompartment()
        if cid not in comps:
            raise ValueError(f"species {sid!r} lies in unknown compartment {cid!r}")
    variable_comps = {c for c in comps if c in assign or c in rate}
    # a zero-dimensional compartment may have no size; its symbol must then not be used
    sizeless = {c for c, obj in comps.items() if dims(c) == 0 and not obj.isSetSize() and c not in initial
                and c not in variable_comps}
    for c in sizeless:
        scope[c] = _SIZELESS

    rate_refs: dict[str, str] = {}  # our name of a symbol -> name of the intermediate holding its rate

    def rate_of(nm: str, where: str) -> str:
        if nm not in rate_refs:
            rate_refs[nm] = _safe_name(f"rateOf_{nm}", taken)
        return rate_refs[nm]

    tr = _MathTranslator(functions, where_model, rate_of)

    def math_of(node, where: str, sc=None) -> ast.Expression:
        if node is None:
            raise ValueError(f"{where}: missing math")
        tr.where = where
        src = tr.expr(node, scope if sc is None else sc)
        return ast.parse(src, mode="eval")

    # ---- local parameters
    local_params: list[tuple[str, float, str]] = []  # (our name, value, unit)
    rate_law: dict[str, ast.Expression] = {}
    for r in m.getListOfReactions():
        rid = r.getId()
        kl = r.getKineticLaw()
        if kl is None or kl.getMath() is None:
            raise _unsupported("reaction without kinetic law", rid)
        sc = dict(scope)
        seen = set()
        for lst in (kl.getListOfParameters(), kl.getListOfLocalParameters()):
            for lp in lst:
                if lp.getId() in seen:
                    continue
                seen.add(lp.getId())
                if not lp.isSetValue():
                    raise _unsupported("local parameter without a value", f"{rid}.{lp.getId()}")
                nm = _safe_name(f"{rid}_{lp.getId()}", taken)
                sc[lp.getId()] = nm
                local_params.append((nm, lp.getValue(), lp.getUnits() if lp.isSetUnits() else ""))
        rate_law[rid] = math_of(kl.getMath(), f"kinetic law of {rid}", sc)
    # translate all math now, so every rateOf reference is known before they are resolved
    assign_math = {v: math_of(r.getMath(), f"assignment rule for {v}") for v, r in assign.items()}
    rate_math = {v: math_of(r.getMath(), f"rate rule for {v}") for v, r in rate.items()}
    initial_math = {v: math_of(ia.getMath(), f"initial assignment for {v}") for v, ia in initial.items()}

    # ---- roles
    state_ids: list[str] = []
    inter_ids: list[str] = []  # assignment-rule targets and reactions, sorted later
    fixed_ids: list[str] = []  # fixed by an initial assignment: intermediates in parameters
    param_ids: list[str] = []
    for sid in order:
        k = kind[sid]
        if sid in sizeless:
            continue
        if k == "reaction" or sid in assign:
            inter_ids.append(sid)
        elif k == "species" or sid in rate:
            state_ids.append(sid)
        elif sid in initial:
            fixed_ids.append(sid)
        else:
            param_ids.append(sid)

    # species whose concentration is read in a compartment of changing size: the state is the amount
    # (what reactions change; a species with no reactions keeps its amount) and the symbol an
    # intermediate amount / size
    state_name = {sid: scope[sid] for sid in state_ids}
    amount_state = [sid for sid in state_ids if kind[sid] == "species" and sid not in rate and is_conc(sid)
                    and species[sid].getCompartment() in variable_comps]
    for sid in amount_state:
        state_name[sid] = _safe_name(f"{scope[sid]}_amt", taken)
        inter_ids.append(sid)

    def value_of(sid: str) -> float:
        k = kind[sid]
        if k == "compartment":
            c = comps[sid]
            if c.isSetSize():
                return c.getSize()
            raise _unsupported("undefined value", f"compartment {sid!r} has no size")
        if k == "parameter":
            if params[sid].isSetValue():
                return params[sid].getValue()
            raise _unsupported("undefined value", f"parameter {sid!r} has no value")
        if k == "specref":
            sr = specrefs[sid]
            if sr.isSetStoichiometry() and not math.isnan(sr.getStoichiometry()):
                return sr.getStoichiometry()
            raise _unsupported("undefined value", f"species reference {sid!r} has no stoichiometry")
        raise AssertionError(k)

    # ---- initial values: expressions in parameters only
    param_names = {scope[s] for s in param_ids} | {n for n, _, _ in local_params}
    by_name = {scope[s]: s for s in scope}
    init_memo: dict[str, ast.AST] = {}
    busy: set[str] = set()

    def init_of(sid: str) -> ast.AST:
        """AST (expression body) of the value of sid at t = 0, in parameter names."""
        if sid in init_memo:
            return init_memo[sid]
        if sid in busy:
            raise ValueError(f"cyclic initial values involving {sid!r}")
        busy.add(sid)
        k = kind[sid]
        if sid in assign:
            tree = assign_math[sid]
        elif k == "reaction":
            tree = rate_law[sid]
        elif sid in initial:
            tree = initial_math[sid]
        elif k == "species":
            s = species[sid]
            cid = s.getCompartment()
            v = f"({scope[cid]})"
            if s.isSetInitialAmount():
                src = f"({_num(s.getInitialAmount())} / {v})" if is_conc(sid) else _num(s.getInitialAmount())
            elif s.isSetInitialConcentration():
                c = _num(s.getInitialConcentration())
                src = c if is_conc(sid) or amount_only(cid) else f"({c} * {v})"
            else:
                raise _unsupported("undefined value", f"species {sid!r} has no initial amount or concentration")
            tree = ast.parse(src, mode="eval")
        elif scope[sid] in param_names:
            tree = ast.parse(scope[sid], mode="eval")
            busy.discard(sid)
            init_memo[sid] = tree.body
            return tree.body
        else:
            tree = ast.parse(_num(value_of(sid)), mode="eval")

        def repl(nm: str):
            if nm == "t":
                return ast.Constant(0.0)
            if nm in param_names:
                return None
            if nm in by_name:
                return init_of(by_name[nm])
            if nm in rate_names:
                return init_rate(nm)
            raise ValueError(f"initial value of {sid!r}: unknown name {nm!r}")

        body = _Subst(repl).visit(copy.deepcopy(tree)).body
        busy.discard(sid)
        init_memo[sid] = body
        return body

    def init_rate(rname: str) -> ast.AST:
        """Initial value of a rateOf intermediate (defined once derivatives are known)."""
        if rname in init_memo:
            return init_memo[rname]
        if rname in busy:
            raise ValueError(f"cyclic initial values involving {rname!r}")
        busy.add(rname)

        def repl(nm: str):
            if nm == "t":
                return ast.Constant(0.0)
            if nm in param_names:
                return None
            if nm in by_name:
                return init_of(by_name[nm])
            if nm in rate_names:
                return init_rate(nm)
            raise ValueError(f"initial value of {rname!r}: unknown name {nm!r}")

        body = _Subst(repl).visit(copy.deepcopy(rate_defs[rname])).body
        busy.discard(rname)
        init_memo[rname] = body
        return body

    # ---- stoichiometry and derivatives
    stoich_exprs: dict[str, str] = {}
    terms: dict[str, list[str]] = {sid: [] for sid in species}
    for r in m.getListOfReactions():
        rid = r.getId()
        for sign, lst in ((-1, r.getListOfReactants()), (1, r.getListOfProducts())):
            for sr in lst:
                sp = sr.getSpecies()
                if sp not in species:
                    raise ValueError(f"reaction {rid!r} refers to unknown species {sp!r}")
                if sr.isSetStoichiometryMath():
                    sm = sr.getStoichiometryMath()
                    st = ast.unparse(math_of(sm.getMath(), f"stoichiometryMath of {sp} in {rid}"))
                elif sr.isSetId() and sr.getId() in specrefs:
                    st = scope[sr.getId()]
                elif sr.isSetStoichiometry() or m.getLevel() < 3:
                    v = sr.getStoichiometry()
                    if math.isnan(v):
                        raise _unsupported("undefined value", f"stoichiometry of {sp} in {rid}")
                    st = _num(v)
                else:
                    raise _unsupported("undefined value", f"stoichiometry of {sp} in {rid} is not set")
                terms[sp].append(f"{'-' if sign < 0 else ''}{st} * {scope[rid]}")

    derivatives: dict[str, str] = {}
    for sid in state_ids:
        nm = state_name[sid]
        if sid in rate:
            derivatives[nm] = ast.unparse(rate_math[sid])
        elif kind[sid] == "species" and not species[sid].getBoundaryCondition() and not species[sid].getConstant() \
                and terms[sid]:
            s = species[sid]
            total = " + ".join(f"({x})" for x in terms[sid])
            cf = s.getConversionFactor() if s.isSetConversionFactor() else (
                m.getConversionFactor() if m.isSetConversionFactor() else "")
            if cf:
                if cf not in scope:
                    raise ValueError(f"conversion factor {cf!r} is not a symbol")
                total = f"({total}) * {scope[cf]}"
            if is_conc(sid) and sid not in amount_state:
                total = f"({total}) / {scope[s.getCompartment()]}"
            derivatives[nm] = ast.unparse(ast.parse(total, mode="eval"))
        else:
            derivatives[nm] = "0.0"

    # ---- rateOf(x): the derivative of a state, 0 for a constant; refused for assigned variables
    rate_defs: dict[str, ast.Expression] = {}
    for nm, rname in rate_refs.items():
        sid = by_name.get(nm)
        if sid is None or sid in param_ids or sid in fixed_ids:  # local or global constant
            src = "0.0"
        elif sid in assign or kind[sid] == "reaction":
            raise _unsupported("rateOf of an assigned variable", sid)
        elif sid in amount_state:  # d(n/V)/dt = (dn/dt - [S] dV/dt) / V
            cid = species[sid].getCompartment()
            if cid not in rate:
                raise _unsupported("rateOf of an assigned variable", f"{sid} in compartment {cid} set by a rule")
            src = f"(({derivatives[state_name[sid]]}) - {nm} * ({derivatives[state_name[cid]]})) / {scope[cid]}"
        else:
            src = derivatives[state_name[sid]]
        rate_defs[rname] = ast.parse(src, mode="eval")
    rate_names = {v: k for k, v in rate_refs.items()}

    # ---- intermediates: fixed symbols first (parameters only), then rules and rates in dependency order
    expressions: list[tuple[str, str]] = []
    for sid in fixed_ids:
        expressions.append((scope[sid], ast.unparse(init_of(sid))))
    defs: dict[str, ast.Expression] = {}
    for sid in inter_ids:
        if kind[sid] == "reaction":
            defs[scope[sid]] = rate_law[sid]
        elif sid in assign:
            defs[scope[sid]] = assign_math[sid]
        else:  # concentration of an amount state
            defs[scope[sid]] = ast.parse(f"{state_name[sid]} / {scope[species[sid].getCompartment()]}", mode="eval")
    defs.update(rate_defs)
    deps = {nm: {n for n in _names_in(tree) if n in defs} for nm, tree in defs.items()}
    done: list[str] = []
    left = list(defs)
    while left:
        ready = [nm for nm in left if deps[nm] <= set(done)]
        if not ready:
            raise _unsupported("algebraic loop", f"assignment rules/rates depend on each other: {sorted(left)}")
        for nm in ready:
            done.append(nm)
            left.remove(nm)
    for nm in done:
        expressions.append((nm, ast.unparse(defs[nm])))

    # ---- declaration
    parameters = []
    for sid in param_ids:
        k = kind[sid]
        obj = comps.get(sid) or params.get(sid)
        unit = obj.getUnits() if obj is not None and obj.isSetUnits() else ""
        parameters.append(Parameter(scope[sid], value_of(sid), unit, description=f"SBML {k} {sid}", positive=False))
    for nm, v, unit in local_params:
        parameters.append(Parameter(nm, v, unit, description="SBML local parameter", positive=False))

    states = []
    for sid in state_ids:
        body = init_of(sid)
        if sid in amount_state:
            body = ast.BinOp(left=body, op=ast.Mult(), right=init_of(species[sid].getCompartment()))
        init = _fold(ast.Expression(body=body))
        desc = f"SBML {kind[sid]} {sid}"
        if kind[sid] == "species":
            desc += " (concentration)" if is_conc(sid) and sid not in amount_state else " (amount)"
        states.append(State(state_name[sid], init, "", description=desc))

    outputs = []
    amount_out: dict[str, str] = {}
    conc_out: dict[str, str] = {}
    for sid in order:
        nm = scope[sid]
        if sid in sizeless:
            continue
        if kind[sid] == "species":
            cid = species[sid].getCompartment()
            v = scope[cid]
            if sid in amount_state:
                amount, conc = state_name[sid], nm
            elif is_conc(sid):
                amount, conc = f"{nm} * {v}", nm
            else:
                amount, conc = nm, (f"{nm} / {v}" if not amount_only(cid) else None)
            amount_out[sid] = _safe_name(f"{nm}_amount", taken)
            outputs.append(Output(amount_out[sid], amount, "", f"amount of species {sid}"))
            if conc is not None:
                conc_out[sid] = _safe_name(f"{nm}_conc", taken)
                outputs.append(Output(conc_out[sid], conc, "", f"concentration of species {sid}"))
        elif nm not in {s.name for s in states}:
            outputs.append(Output(nm, nm, "", f"SBML {kind[sid]} {sid}"))

    mname = name or _safe_name(m.getId() or "sbml_model", set())
    time_unit = m.getTimeUnits() if m.isSetTimeUnits() else "second"
    model = Model(
        name=mname,
        description=(m.getName() or m.getId() or "imported SBML model"),
        time_unit=time_unit,
        states=states,
        parameters=parameters,
        derivatives=derivatives,
        outputs=outputs,
        expressions=expressions,
        reference=f"imported from SBML level {m.getLevel()} version {m.getVersion()}",
    )
    return SbmlImport(model, {k: v for k, v in scope.items() if v is not _SIZELESS}, amount_out, conc_out)
