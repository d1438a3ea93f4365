"""Declare an ODE model once; code generators turn it into backend kernels.

A declaration lists states (with initial values), parameters (units, defaults), piecewise-constant
inputs that only events change (e.g. an infusion rate), ordered intermediate expressions,
derivatives and outputs. Expressions are strings in a small arithmetic language checked here
(numbers, names, + - * / **, and a fixed set of functions), so generated code can only be what
the declaration says. Models come from the model library, never from job files.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

FUNCTIONS = ("exp", "log", "sqrt", "pow", "abs", "min", "max", "tanh", "sin", "cos", "ifelse")
# ifelse(cond, a, b): a where cond holds, else b; cond is a single comparison (<, <=, >, >=)
CONSTANTS = ("pi",)
# names the generated NumPy/C code uses itself, and C/C++ keywords: a model may not declare them
RESERVED = frozenset("""
t y p u dy o np P T m pat real k yn
NS NP NIN NOUT NP_ARR DEVICE EVT OUT_AT KERNEL_CUDA
auto break case char const continue default do double else enum extern float for goto if inline int long
register restrict return short signed sizeof static struct switch typedef union unsigned void volatile while
bool true false class delete new namespace operator private protected public template this throw try
""".split()) | set(FUNCTIONS) | set(CONSTANTS)


@dataclass(frozen=True)
class State:
    name: str
    init: str | float = 0.0  # number or expression in parameters
    unit: str = ""
    description: str = ""


@dataclass(frozen=True)
class Parameter:
    name: str
    default: float
    unit: str = ""
    description: str = ""
    positive: bool = True  # individual values must be > 0 (else the patient fails: invalid_parameter)


@dataclass(frozen=True)
class Input:
    """Piecewise-constant per-patient input; starts at 0 and changes only at events."""

    name: str
    unit: str = ""


@dataclass(frozen=True)
class Output:
    name: str
    expr: str
    unit: str = ""
    description: str = ""


@dataclass(frozen=True)
class BolusTarget:
    """A dose that adds amount × fraction to a state at the dose time."""

    state: str
    fraction: str | None = None  # parameter name (bioavailability), or None for 1


@dataclass(frozen=True)
class InfusionTarget:
    """A dose given at rate amount/duration into an input over [time, time + duration]."""

    input: str
    fraction: str | None = None


@dataclass
class Model:
    name: str
    description: str
    time_unit: str
    states: list[State]
    parameters: list[Parameter]
    derivatives: dict[str, str]
    outputs: list[Output]
    expressions: list[tuple[str, str]] = field(default_factory=list)
    inputs: list[Input] = field(default_factory=list)
    doses: dict[str, BolusTarget | InfusionTarget] = field(default_factory=dict)
    reference: str = ""

    def __post_init__(self) -> None:
        self._check()

    # ---------------------------------------------------------------- lookups
    @property
    def state_names(self) -> list[str]:
        return [s.name for s in self.states]

    @property
    def parameter_names(self) -> list[str]:
        return [p.name for p in self.parameters]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.parameters}

    def unit_of(self, name: str) -> str:
        for group in (self.outputs, self.states, self.parameters, self.inputs):
            for x in group:
                if x.name == name:
                    return x.unit
        raise KeyError(name)

    def observable(self) -> list[str]:
        """Names a job may ask for as outputs: declared outputs and states."""
        return self.output_names + self.state_names

    # ---------------------------------------------------------------- checks
    def _check(self) -> None:
        names: list[str] = ["t"]
        for group in (self.states, self.parameters, self.inputs):
            names += [x.name for x in group]
        names += [n for n, _ in self.expressions]
        bad = sorted((set(names) - {"t"}) & RESERVED | {n for n in names if n.startswith(("TWIN_", "_twin"))})
        if bad:
            raise ValueError(f"model {self.name}: names {bad} are reserved by the code generators; rename them")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model {self.name}: duplicate names {sorted(dup)}")
        if set(self.derivatives) != set(self.state_names):
            raise ValueError(
                f"model {self.name}: derivatives given for {sorted(self.derivatives)}, states are {sorted(self.state_names)}"
            )
        known = {"t"} | set(self.state_names) | set(self.parameter_names) | set(self.input_names)
        for n, e in self.expressions:
            check_expr(e, known, f"{self.name}.{n}")
            known.add(n)
        for s, e in self.derivatives.items():
            check_expr(e, known, f"{self.name}.d{s}/dt")
        for o in self.outputs:
            check_expr(o.expr, known, f"{self.name}.{o.name}")
        pnames = set(self.parameter_names)
        for s in self.states:
            if isinstance(s.init, str):
                check_expr(s.init, pnames, f"{self.name}.{s.name}(0)")
        for route, tgt in self.doses.items():
            if isinstance(tgt, BolusTarget) and tgt.state not in self.state_names:
                raise ValueError(f"model {self.name}: dose route {route} targets unknown state {tgt.state}")
            if isinstance(tgt, InfusionTarget) and tgt.input not in self.input_names:
                raise ValueError(f"model {self.name}: dose route {route} targets unknown input {tgt.input}")
            if tgt.fraction is not None and tgt.fraction not in pnames:
                raise ValueError(f"model {self.name}: dose fraction {tgt.fraction} is not a parameter")


def check_expr(expr: str, known: set[str], where: str) -> ast.Expression:
    """Parse and whitelist an expression; returns its AST."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"{where}: cannot parse {expr!r}: {e.msg}") from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Load, ast.operator, ast.unaryop)):
            if isinstance(node, (ast.operator,)) and not isinstance(
                node, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)
            ):
                raise ValueError(f"{where}: operator {type(node).__name__} not allowed")
            if isinstance(node, ast.unaryop) and not isinstance(node, (ast.USub, ast.UAdd)):
                raise ValueError(f"{where}: operator {type(node).__name__} not allowed")
            continue
        if isinstance(node, (ast.BinOp, ast.UnaryOp)):
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            continue
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS) or node.keywords:
                raise ValueError(f"{where}: only calls to {FUNCTIONS} are allowed")
            want = {"ifelse": 3, "pow": 2, "min": 2, "max": 2}.get(node.func.id, 1)
            if len(node.args) != want:
                raise ValueError(f"{where}: {node.func.id} takes {want} argument(s)")
            if node.func.id == "ifelse" and not isinstance(node.args[0], ast.Compare):
                raise ValueError(f"{where}: the first argument of ifelse must be a comparison")
            continue
        if isinstance(node, ast.Compare):
            if len(node.ops) != 1 or not isinstance(node.ops[0], (ast.Lt, ast.LtE, ast.Gt, ast.GtE)):
                raise ValueError(f"{where}: only single comparisons <, <=, >, >= are allowed")
            continue
        if isinstance(node, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)):
            continue
        if isinstance(node, ast.Name):
            if node.id not in known and node.id not in FUNCTIONS and node.id not in CONSTANTS:
                raise ValueError(f"{where}: unknown name {node.id!r}")
            continue
        raise ValueError(f"{where}: {type(node).__name__} not allowed in {expr!r}")
    return tree
