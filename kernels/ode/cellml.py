"""Import cardiac cell models (CellML 1.0/1.1/2.0, Myokit .mmt) as `Model` declarations.

`import_cellml(path)` and `import_mmt(path)` read a model with Myokit (imported lazily: only these
importers need it) and translate it into the same declaration the model library uses, so every
backend (numpy, cpu, cuda) runs it unchanged:

* states, in the model's own order, with their initial values (numbers; an initial value written
  in literal constants becomes an expression in those parameters);
* parameters: every literal constant (a variable defined by numbers only, e.g. ``g = 0.1`` or
  ``amplitude = -58 * 2``), with its unit; not constrained to be positive (a model does not say);
  ``constants={"cell.mode": 0}`` overrides defaults (Myokit qname or our name). Variables bound to
  an external input other than time and pace (e.g. ``diffusion_current``) are constants at their
  default value;
* intermediates: every other variable the derivatives or outputs need, topologically ordered
  (a depth-first walk in declaration order; a cycle raises); derived constants stay expressions in
  parameters so changing one parameter changes everything derived from it. ``dot(x)`` used inside
  an equation becomes an intermediate ``dot_<x>`` equal to x's derivative;
* names: ``component.variable`` -> ``component_variable`` (nested variables likewise), made safe
  against the code generators' reserved names and each other by appending ``_``.

Expressions are translated node by node from Myokit's expression tree into the checked language
of kernels/ode/model.py: ``if`` and ``piecewise`` become nested ``ifelse`` with single comparisons,
conditions built from and / or / not, ``==`` and ``!=`` are rewritten (``x == y`` <=> not x < y and
not x > y); a number used as a condition means "!= 0", a condition used as a number is 1 or 0;
``log(x, b)`` -> ``log(x) / log(b)``, ``log10``, ``tan`` are rewritten exactly. Functions with no
exact rewrite (floor, ceil, quotient, remainder, asin, acos, atan, partial derivatives, initial
values) raise ``ValueError("unsupported CellML/Myokit feature: ...")`` naming the feature and the
variable; the stimulus protocol's ``floor`` is not translated because the stimulus is replaced:

Stimulus. The model's own pacing (Myokit: ``i_stim = engine.pace * amplitude`` with the ``pace``
binding and an embedded protocol; CellML: a time-periodic piecewise of ``floor``, found through the
oxmeta annotation ``membrane_stimulus_current`` or its name) is replaced by a piecewise-constant
input ``i_stim_amp`` in the stimulus current's own unit: the stimulus variable becomes equal to
the input, which starts at 0 and changes only at events (engine/pacing.py adds the amplitude at
each beat start and subtracts it at the end). The model's default protocol is kept as parameters
``stim_amplitude`` (the stimulus current during a pulse, sign as in the model, e.g. -116 A/F for
the Myokit O'Hara-Rudy file), ``stim_duration``, ``stim_period`` and ``stim_offset`` (the first
pulse's start); they appear in no equation and engine/pacing.py reads them as defaults. Constants
only the original stimulus definition used are dropped.

Outputs (canonical names, where the model has the variable): ``V`` membrane potential, ``Cai``
cytosolic calcium, ``i_stim`` the stimulus current, and the currents ``INa``, ``INaL``, ``ICaL``
(the calcium component of the L-type current, as CiPA's qNet uses it), ``IKr``, ``IKs``,
``IK1``, ``Ito``. Variables are found through oxmeta annotations (CellML), Myokit labels, then
names (case and underscores ignored). `import_*_mapped` also return where each came from.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .model import CONSTANTS, FUNCTIONS, RESERVED, Input, Model, Output, Parameter, State

__all__ = ["import_cellml", "import_mmt", "import_cellml_mapped", "import_mmt_mapped", "CellImport",
           "STIM_INPUT", "QNET_CURRENTS"]

STIM_INPUT = "i_stim_amp"
QNET_CURRENTS = ("INaL", "ICaL", "IKr", "IKs", "IK1", "Ito")  # Dutta et al. 2017; Li et al. 2017
_STIM_PARAMS = ("stim_amplitude", "stim_duration", "stim_period", "stim_offset")

# role -> (oxmeta annotations, Myokit labels, normalised variable names in order of preference)
_ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "V": (("membrane_voltage",), ("membrane_potential",), ("v", "vm", "vmembrane")),
    "Cai": (("cytosolic_calcium_concentration",), ("cytosolic_calcium_concentration",), ("cai",)),
    "INa": (("membrane_fast_sodium_current",), ("I_Na",), ("ina", "inafast")),
    "INaL": (("membrane_persistent_sodium_current",), ("I_NaL",), ("inal", "inalate")),
    # the Ca component (ORd-family models split ICaL into Ca, Na and K parts; qNet uses the Ca part)
    "ICaL": (("membrane_L_type_calcium_current",), (), ("icalca", "ical")),
    "IKr": (("membrane_rapid_delayed_rectifier_potassium_current",), ("I_Kr",), ("ikr",)),
    "IKs": (("membrane_slow_delayed_rectifier_potassium_current",), ("I_Ks",), ("iks",)),
    "IK1": (("membrane_inward_rectifier_potassium_current",), ("I_K1",), ("ik1",)),
    "Ito": (("membrane_transient_outward_current",), ("I_to",), ("ito",)),
}
_UNITS = {"V": "mV"}

_NAME_RESERVED = set(RESERVED) | set(FUNCTIONS) | set(CONSTANTS) | {"time"}


def _unsupported(feature: str, detail: str = "") -> ValueError:
    return ValueError(f"unsupported CellML/Myokit feature: {feature}" + (f" ({detail})" if detail else ""))


def _myokit():
    try:
        import myokit
        import myokit.formats  # noqa: F401
    except ImportError:  # pragma: no cover - exercised only without myokit
        raise ImportError("the CellML/Myokit importers need myokit (pip install myokit)") from None
    return myokit


@dataclass
class Stimulus:
    """The model file's own default pacing protocol (time and current in the model's units)."""

    amplitude: float
    duration: float
    period: float
    offset: float
    source: str  # where the values came from


@dataclass
class CellImport:
    """An imported cell model with the map from Myokit qnames to declaration names."""

    model: Model
    names: dict[str, str]  # Myokit qname -> state / parameter / intermediate name
    roles: dict[str, str] = field(default_factory=dict)  # output name (V, Cai, IKr, ...) -> qname
    stimulus: Stimulus | None = None
    stimulus_variable: str = ""  # qname of the variable replaced by the input


# ------------------------------------------------------------------------------------------ math
@dataclass
class _Cond:
    """('cmp', op, a, b) | ('and', [..]) | ('or', [..]) | ('not', c)."""

    kind: str
    args: tuple


def _num(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        raise _unsupported("non-finite constant", repr(x))
    return f"({float(x)!r})"


def _branch(c: _Cond, a: str, b: str) -> str:
    """Expression equal to a where c holds, else b, from single comparisons only."""
    if c.kind == "not":
        return _branch(c.args[0], b, a)
    if c.kind == "and":
        out = a
        for sub in reversed(c.args):
            out = _branch(sub, out, b)
        return out
    if c.kind == "or":
        out = b
        for sub in reversed(c.args):
            out = _branch(sub, a, out)
        return out
    op, x, y = c.args
    if op in ("<", "<=", ">", ">="):
        return f"ifelse({x} {op} {y}, {a}, {b})"
    if op == "==":
        return f"ifelse({x} < {y}, {b}, ifelse({x} > {y}, {b}, {a}))"
    if op == "!=":
        return f"ifelse({x} < {y}, {a}, ifelse({x} > {y}, {a}, {b}))"
    raise AssertionError(op)


class _Translator:
    """Myokit expression -> expression-language string with parenthesised sub-expressions."""

    def __init__(self, mk, name_of, where: str = ""):
        self.mk = mk
        self.name_of = name_of  # callable(Name or Derivative node) -> our name
        self.where = where

    def expr(self, e) -> str:
        mk = self.mk
        x = self.expr
        if isinstance(e, mk.Number):
            return _num(float(e.eval()))
        if isinstance(e, (mk.Name, mk.Derivative)):
            return self.name_of(e)
        if isinstance(e, (mk.PartialDerivative, mk.InitialValue)):
            raise _unsupported(type(e).__name__, self.where)
        if isinstance(e, mk.Condition):  # a condition read as a number is 1 or 0
            return _branch(self.cond(e), "(1.0)", "(0.0)")
        ops = list(e)
        if isinstance(e, mk.PrefixPlus):
            return x(ops[0])
        if isinstance(e, mk.PrefixMinus):
            return f"(-{x(ops[0])})"
        infix = {mk.Plus: "+", mk.Minus: "-", mk.Multiply: "*", mk.Divide: "/", mk.Power: "**"}
        for cls, op in infix.items():
            if type(e) is cls:
                return f"({x(ops[0])} {op} {x(ops[1])})"
        simple = {mk.Sqrt: "sqrt", mk.Exp: "exp", mk.Sin: "sin", mk.Cos: "cos", mk.Abs: "abs"}
        for cls, f in simple.items():
            if type(e) is cls:
                return f"{f}({x(ops[0])})"
        if type(e) is mk.Log:
            if len(ops) == 1:
                return f"log({x(ops[0])})"
            return f"(log({x(ops[0])}) / log({x(ops[1])}))"
        if type(e) is mk.Log10:
            return f"(log({x(ops[0])}) / log(10.0))"
        if type(e) is mk.Tan:
            a = x(ops[0])
            return f"(sin({a}) / cos({a}))"
        if type(e) is mk.If:
            return _branch(self.cond(e.condition()), x(e.value(True)), x(e.value(False)))
        if type(e) is mk.Piecewise:
            conds, pieces = list(e.conditions()), list(e.pieces())
            out = x(pieces[-1])
            for c, v in reversed(list(zip(conds, pieces[:-1]))):
                out = _branch(self.cond(c), x(v), out)
            return out
        raise _unsupported(f"function {getattr(e, '_fname', None) or type(e).__name__!r}", f"{self.where}: {e.code()}")

    def cond(self, e) -> _Cond:
        mk = self.mk
        cmp = {mk.Less: "<", mk.LessEqual: "<=", mk.More: ">", mk.MoreEqual: ">=", mk.Equal: "==",
               mk.NotEqual: "!="}
        for cls, op in cmp.items():
            if type(e) is cls:
                a, b = list(e)
                return _Cond("cmp", (op, self.expr(a), self.expr(b)))
        if type(e) is mk.And:
            return _Cond("and", tuple(self.cond(c) for c in e))
        if type(e) is mk.Or:
            return _Cond("or", tuple(self.cond(c) for c in e))
        if type(e) is mk.Not:
            return _Cond("not", (self.cond(list(e)[0]),))
        if isinstance(e, mk.Condition):
            raise _unsupported(f"condition {type(e).__name__}", self.where)
        return _Cond("cmp", ("!=", self.expr(e), "(0.0)"))  # a number read as a condition


# --------------------------------------------------------------------------------------- helpers
def _safe_name(qname: str, taken: set[str]) -> str:
    name = re.sub(r"\W", "_", qname)
    if not re.match(r"[A-Za-z_]", name) or name.startswith(("TWIN_", "_twin")):
        name = "v_" + name
    while name in _NAME_RESERVED or name in taken:
        name += "_"
    taken.add(name)
    return name


def _unit(v) -> str:
    u = v.unit()
    if u is None:
        return ""
    s = str(u).strip()
    return s[1:-1] if s.startswith("[") and s.endswith("]") else s


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _refs(mk, e) -> tuple[set, set]:
    """Variables whose value, and states whose derivative, expression e refers to."""
    vals, dots = set(), set()
    for node in e.walk():
        if isinstance(node, mk.Derivative):
            dots.add(node.var())
        elif isinstance(node, mk.Name):
            vals.add(node.var())
    return vals, dots


# ---------------------------------------------------------------------------------------- import
def import_cellml(path: str | os.PathLike, *, name: str | None = None, constants: dict | None = None) -> Model:
    """Translate a CellML file into a `Model` (stimulus replaced by the input ``i_stim_amp``)."""
    return import_cellml_mapped(path, name=name, constants=constants).model


def import_mmt(path: str | os.PathLike, *, name: str | None = None, constants: dict | None = None) -> Model:
    """Translate a Myokit .mmt file into a `Model` (stimulus replaced by the input ``i_stim_amp``)."""
    return import_mmt_mapped(path, name=name, constants=constants).model


def import_cellml_mapped(path: str | os.PathLike, *, name: str | None = None,
                         constants: dict | None = None) -> CellImport:
    mk = _myokit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unit and annotation warnings of the CellML parser
        try:
            m = mk.formats.importer("cellml").model(str(path))
        except mk.ImportError as e:
            raise ValueError(f"invalid CellML: {e}") from None
    return _translate(mk, m, None, Path(path), name, constants, "CellML")


def import_mmt_mapped(path: str | os.PathLike, *, name: str | None = None,
                      constants: dict | None = None) -> CellImport:
    mk = _myokit()
    try:
        m, protocol, _ = mk.load(str(path))
    except mk.MyokitError as e:
        raise ValueError(f"invalid Myokit model: {e}") from None
    if m is None:
        raise ValueError(f"{path}: no [[model]] section")
    return _translate(mk, m, protocol, Path(path), name, constants, "Myokit mmt")


def _find_stimulus(mk, m, protocol, path: Path):
    """(stimulus variable, Stimulus defaults, variables the translation must not meet: the pace)."""
    time = m.time()
    pace = m.binding("pace")
    ox = {v.meta["oxmeta"]: v for v in m.variables(deep=True) if "oxmeta" in v.meta}
    if pace is not None:
        users = [v for v in m.variables(deep=True) if v.rhs() is not None and v is not pace
                 and pace in _refs(mk, v.rhs())[0]]
        if len(users) != 1:
            raise _unsupported("stimulus not recognised", f"expected one variable using the pace binding, found "
                               f"{len(users)}: {', '.join(u.qname() for u in users)}")
        stim = users[0]
        on = float(stim.rhs().eval(subst={pace.lhs(): mk.Number(1.0)}))
        off = float(stim.rhs().eval(subst={pace.lhs(): mk.Number(0.0)}))
        if off != 0.0:
            raise _unsupported("stimulus not zero when pace is 0", stim.qname())
        if protocol is not None and len(list(protocol.events())):
            ev = list(protocol.events())[0]
            level = ev.level()
            period = ev.period() if ev.period() > 0 else 1000.0  # a one-off pulse: 1000 ms as the default
            defaults = Stimulus(on * level, ev.duration(), period, ev.start(),
                                f"{stim.qname()} = {stim.rhs().code()} with the file's [[protocol]]")
        else:
            defaults = Stimulus(on, 0.5, 1000.0, 0.0,
                                f"{stim.qname()} at pace 1; no [[protocol]]: 0.5 ms every 1000 ms")
        extra = {pace}
    else:
        stim = ox.get("membrane_stimulus_current")
        if stim is None:
            cands = [v for v in m.variables(deep=True) if _norm(v.name()) in ("istim", "istimulus", "stimcurrent")
                     and not v.is_state()]
            if len(cands) != 1:
                raise _unsupported("no stimulus current found", f"{path.name}: no oxmeta membrane_stimulus_current "
                                   f"and {len(cands)} variable(s) named like i_stim")
            stim = cands[0]
        deps = _closure(mk, [stim])
        consts = {v for v in deps if v.is_literal() and not v.is_state() and v is not time}

        def pick(key: str, pattern: str):
            v = ox.get(f"membrane_stimulus_current_{key}")
            if v is None or v not in consts:
                hits = [c for c in consts if re.search(pattern, c.name(), re.I)]
                v = hits[0] if len(hits) == 1 else None
            return v

        va, vd, vp, vo = (pick("amplitude", "amp"), pick("duration", "dur"), pick("period", "period|cl$|bcl"),
                          pick("offset", "start|offset|delay"))
        if va is None or vd is None or vp is None:
            raise _unsupported("stimulus protocol not recognised",
                               f"{stim.qname()}: amplitude/duration/period constants not found")
        defaults = Stimulus(float(va.eval()), float(vd.eval()), float(vp.eval()),
                            float(vo.eval()) if vo is not None else 0.0,
                            f"{stim.qname()}: " + ", ".join(f"{k}={v.qname()}" for k, v in
                                                            zip(("amplitude", "duration", "period", "offset"),
                                                                (va, vd, vp, vo)) if v is not None))
        extra = set()
    return stim, defaults, extra


def _closure(mk, roots) -> set:
    """Variables (values and derivatives) the roots' equations depend on, roots included."""
    seen, stack = set(), list(roots)
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v.rhs() is not None:
            vals, dots = _refs(mk, v.rhs())
            stack += [w for w in vals | dots if w not in seen]
    return seen


def _find_roles(mk, m, stim) -> dict:
    out = {}
    allv = [v for v in m.variables(deep=True)]
    ox = {v.meta["oxmeta"]: v for v in allv if "oxmeta" in v.meta}
    labels = {v.label(): v for v in allv if v.label()}
    for role, (oxs, labs, names) in _ROLES.items():
        v = next((ox[k] for k in oxs if k in ox), None) or next((labels[k] for k in labs if k in labels), None)
        if v is None:
            for nm in names:
                hits = [w for w in allv if _norm(w.name()) == nm]
                if len(hits) > 1:  # prefer the one in a component named like the variable
                    hits = [w for w in hits if _norm(w.parent(mk.Component).name()).startswith(nm[:3])] or hits
                if len(hits) == 1:
                    v = hits[0]
                    break
        if v is not None:
            out[role] = v
    out["i_stim"] = stim
    return out


def _translate(mk, m, protocol, path: Path, name, constants, fmt: str) -> CellImport:
    time = m.time()
    if time is None:
        raise ValueError(f"{path.name}: no variable bound to time")
    stim, stim_defaults, skip = _find_stimulus(mk, m, protocol, path)
    roles = _find_roles(mk, m, stim)
    if "V" not in roles:
        raise ValueError(f"{path.name}: membrane potential not found")

    states = list(m.states())
    # variables the model needs: the states' equations and the outputs, through the new stimulus
    roots = states + [v for v in roles.values() if v is not stim]
    needed: set = set()
    stack = list(roots)
    dotted: set = set()  # states whose derivative an equation reads
    while stack:
        v = stack.pop()
        if v in needed:
            continue
        needed.add(v)
        if v is stim or v is time or (v.is_bound() and v is not stim):
            continue
        vals, dots = _refs(mk, v.rhs())
        dotted |= {d for d in dots if v is not d}
        stack += [w for w in vals | dots if w not in needed]
    needed.add(stim)
    order = [v for v in m.variables(deep=True)]
    index = {v: i for i, v in enumerate(order)}

    taken: set[str] = set(_STIM_PARAMS) | {STIM_INPUT}
    names: dict = {}

    def nm(v) -> str:
        if v not in names:
            names[v] = _safe_name(v.qname(), taken)
        return names[v]

    for v in states:
        nm(v)
    dot_names = {s: _safe_name(f"dot_{nm(s)}", taken) for s in sorted(dotted, key=lambda s: index[s])}

    def name_of(node) -> str:
        v = node.var()
        if isinstance(node, mk.Derivative):
            return dot_names[v]
        if v is time:
            return "t"
        if v in skip:
            raise _unsupported("pace used outside the stimulus current", tr.where)
        return nm(v)

    tr = _Translator(mk, name_of)

    # ---- roles of the needed non-state variables
    params, inters = [], []
    for v in sorted(needed, key=lambda v: index[v]):
        if v.is_state() or v is time or v in skip:
            continue
        if v is stim:
            inters.append(v)
        elif v.is_literal() or (v.is_bound() and v.rhs() is not None and v.rhs().is_literal()):
            params.append(v)
        elif v.is_bound():
            raise _unsupported(f"binding {v.binding()!r}", v.qname())
        else:
            inters.append(v)
    # literal constants nothing needs stay parameters, except those only the old stimulus used
    stim_only = _closure(mk, [stim]) - {stim}
    for v in m.variables(deep=True, const=True):
        if v not in needed and v.is_literal() and not v.is_state() and v not in stim_only:
            params.append(v)
    params.sort(key=lambda v: index[v])

    overrides = dict(constants or {})
    parameters = []
    for v in params:
        val = float(v.rhs().eval())
        for key in (v.qname(), nm(v)):
            if key in overrides:
                val = float(overrides.pop(key))
        desc = v.meta.get("desc", "") if hasattr(v, "meta") else ""
        parameters.append(Parameter(nm(v), val, _unit(v), positive=False,
                                    description=f"{fmt} {v.qname()}" + (f": {desc}" if desc else "")))
    if overrides:
        raise ValueError(f"constants {sorted(overrides)} are not literal constants of {path.name}")
    t_unit = _unit(time) or "ms"
    s_unit = _unit(stim)
    for pname, val, unit, desc in (
            ("stim_amplitude", stim_defaults.amplitude, s_unit, "stimulus current during a pulse"),
            ("stim_duration", stim_defaults.duration, t_unit, "pulse duration"),
            ("stim_period", stim_defaults.period, t_unit, "cycle length"),
            ("stim_offset", stim_defaults.offset, t_unit, "start of the first pulse")):
        parameters.append(Parameter(pname, val, unit, positive=False,
                                    description=f"default pacing from the model file ({desc}); in no equation: "
                                                f"engine.pacing reads it ({stim_defaults.source})"))

    # ---- intermediates, depth-first in declaration order
    defs: dict = {}
    for v in inters:
        tr.where = v.qname()
        defs[v] = STIM_INPUT if v is stim else tr.expr(v.rhs())
    deps = {v: {w for w in _refs(mk, v.rhs())[0] if w in defs} if v is not stim else set() for v in defs}
    dot_deps = {}
    for v in defs:
        if v is not stim:
            dot_deps[v] = {d for d in _refs(mk, v.rhs())[1] if d in dot_names}
    expressions: list[tuple[str, str]] = []
    done: set = set()
    busy: set = set()
    dot_done: set = set()

    def visit(v):
        if v in done:
            return
        if v in busy:
            raise _unsupported("algebraic loop", f"{v.qname()} depends on itself")
        busy.add(v)
        for w in sorted(deps[v], key=lambda w: index[w]):
            visit(w)
        for s in sorted(dot_deps.get(v, ()), key=lambda w: index[w]):
            visit_dot(s)
        busy.discard(v)
        done.add(v)
        expressions.append((nm(v), defs[v]))

    def visit_dot(s):
        if s in dot_done:
            return
        if s in busy:
            raise _unsupported("algebraic loop", f"dot({s.qname()}) depends on itself")
        busy.add(s)
        vals, dots = _refs(mk, s.rhs())
        for w in sorted((x for x in vals if x in defs), key=lambda w: index[w]):
            visit(w)
        for d in sorted((x for x in dots if x in dot_names), key=lambda w: index[w]):
            visit_dot(d)
        busy.discard(s)
        dot_done.add(s)
        tr.where = f"dot({s.qname()})"
        expressions.append((dot_names[s], tr.expr(s.rhs())))

    for v in sorted(defs, key=lambda v: index[v]):
        visit(v)
    for s in sorted(dotted, key=lambda v: index[v]):
        visit_dot(s)

    # ---- states and derivatives
    pnames = {v: nm(v) for v in params}
    state_decl, derivatives = [], {}
    for s in states:
        iv = s.initial_value()
        if iv.is_literal():
            init: str | float = float(iv.eval())
        else:
            vals, dots = _refs(mk, iv)
            if dots or not vals <= set(pnames):
                init = float(s.initial_value(True))
            else:
                tr.where = f"initial value of {s.qname()}"
                init = tr.expr(iv)
        desc = s.meta.get("desc", "") if hasattr(s, "meta") else ""
        state_decl.append(State(nm(s), init, _unit(s),
                                description=f"{fmt} {s.qname()}" + (f": {desc}" if desc else "")))
        tr.where = f"dot({s.qname()})"
        derivatives[nm(s)] = dot_names[s] if s in dot_names else tr.expr(s.rhs())

    # ---- outputs
    outputs = []
    for role, v in roles.items():
        expr = "t" if v is time else nm(v)
        unit = _unit(v) or _UNITS.get(role, "")
        what = "stimulus current (the input i_stim_amp)" if v is stim else f"{fmt} {v.qname()}"
        outputs.append(Output(role, expr, unit, what))

    mname = name or _safe_name(path.stem, set())
    desc = m.meta.get("name", "") or m.name() or path.stem
    model = Model(
        name=mname,
        description=f"{desc} (imported from {path.name}; stimulus = input {STIM_INPUT})",
        time_unit=t_unit,
        states=state_decl,
        parameters=parameters,
        derivatives=derivatives,
        outputs=outputs,
        expressions=expressions,
        inputs=[Input(STIM_INPUT, s_unit)],
        reference=f"imported with myokit {mk.__version__} from {fmt} {path.name}",
    )
    return CellImport(model, {v.qname(): n for v, n in names.items()},
                      {r: v.qname() for r, v in roles.items()}, stim_defaults, stim.qname())
