"""Simple models written in TOML instead of Python: the same declaration, the same checks.

    [model]
    name = "emax_turnover"
    description = "..."
    time_unit = "h"
    [states.R]            # one table per state, in order
    init = "kin / kout"   # number or expression in parameters
    unit = "1"
    [parameters.kin]
    default = 10.0
    unit = "1/h"
    [expressions]         # ordered intermediates
    C = "A / V"
    [derivatives]
    R = "kin - kout * R"
    [outputs.C]
    expr = "C"
    unit = "mg/L"
    [doses.iv_bolus]      # route -> state (bolus) or input (infusion), optional fraction parameter
    state = "A"

Expressions are strings in the checked expression language (kernels/ode/model.py): numbers, names,
arithmetic and a fixed set of functions. Nothing else can be written, and nothing is evaluated
as Python: code generators translate the checked syntax tree.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from .model import BolusTarget, InfusionTarget, Input, Model, Output, Parameter, State

_TOP = {"model", "states", "parameters", "inputs", "expressions", "derivatives", "outputs", "doses"}


def _table(d: dict, key: str, where: str) -> dict:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise ValueError(f"{where}: [{key}] must be a table")
    return v


def _only(d: dict, allowed: set[str], where: str) -> None:
    extra = set(d) - allowed
    if extra:
        raise ValueError(f"{where}: unknown key(s) {sorted(extra)}; allowed: {sorted(allowed)}")


def load_model_toml(path: str | Path) -> Model:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: malformed TOML: {e}") from None
    _only(data, _TOP, str(p))
    head = _table(data, "model", str(p))
    _only(head, {"name", "description", "time_unit", "reference"}, f"{p} [model]")
    if "name" not in head:
        raise ValueError(f"{p}: [model] needs 'name'")

    def num_or_str(v, where):
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError(f"{where}: must be a number or an expression string, got {v!r}")
        return v

    states = []
    for n, s in _table(data, "states", str(p)).items():
        _only(s, {"init", "unit", "description"}, f"{p} [states.{n}]")
        states.append(State(n, num_or_str(s.get("init", 0.0), f"{p} states.{n}.init"), s.get("unit", ""),
                            s.get("description", "")))
    params = []
    for n, s in _table(data, "parameters", str(p)).items():
        _only(s, {"default", "unit", "description", "positive"}, f"{p} [parameters.{n}]")
        if not isinstance(s.get("default"), (int, float)) or isinstance(s.get("default"), bool):
            raise ValueError(f"{p}: parameters.{n}.default must be a number")
        params.append(Parameter(n, float(s["default"]), s.get("unit", ""), s.get("description", ""),
                                bool(s.get("positive", True))))
    inputs = [Input(n, s.get("unit", "")) for n, s in _table(data, "inputs", str(p)).items()]
    exprs = [(n, str(num_or_str(e, f"{p} expressions.{n}"))) for n, e in _table(data, "expressions", str(p)).items()]
    derivs = {n: str(num_or_str(e, f"{p} derivatives.{n}")) for n, e in _table(data, "derivatives", str(p)).items()}
    outs = []
    for n, s in _table(data, "outputs", str(p)).items():
        _only(s, {"expr", "unit", "description"}, f"{p} [outputs.{n}]")
        outs.append(Output(n, str(num_or_str(s.get("expr", n), f"{p} outputs.{n}.expr")), s.get("unit", ""),
                           s.get("description", "")))
    doses = {}
    for route, s in _table(data, "doses", str(p)).items():
        _only(s, {"state", "input", "fraction"}, f"{p} [doses.{route}]")
        if ("state" in s) == ("input" in s):
            raise ValueError(f"{p}: doses.{route} needs exactly one of 'state' (bolus) or 'input' (infusion)")
        doses[route] = (BolusTarget(s["state"], s.get("fraction")) if "state" in s
                        else InfusionTarget(s["input"], s.get("fraction")))
    return Model(name=head["name"], description=head.get("description", ""), time_unit=head.get("time_unit", ""),
                 states=states, parameters=params, derivatives=derivs, outputs=outs, expressions=exprs, inputs=inputs,
                 doses=doses, reference=head.get("reference", ""))
