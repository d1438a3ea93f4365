"""Unit conversion for imported observations (UCUM spellings as FHIR writes them, plus common ones).

Each unit maps to (dimension, factor to the dimension's base unit). Mass and molar concentrations
convert into each other only when the variable declares a molar mass (glucose: 180.156 g/mol, so
1 mmol/L = 18.016 mg/dL).
"""

from __future__ import annotations

_UNITS: dict[str, tuple[str, float]] = {}


def _add(dim: str, base_factor: float, *names: str) -> None:
    for n in names:
        _UNITS[n] = (dim, base_factor)


# mass concentration, base mg/L
_add("mass_conc", 1.0, "mg/L", "ug/mL", "µg/mL", "mcg/mL", "ug/ml", "mg/l")
_add("mass_conc", 1e-3, "ng/mL", "ug/L", "µg/L", "ng/ml")
_add("mass_conc", 10.0, "mg/dL", "mg/dl")
_add("mass_conc", 1e3, "g/L", "g/l")
# molar concentration, base mmol/L
_add("molar_conc", 1.0, "mmol/L", "mmol/l", "mM")
_add("molar_conc", 1e-3, "umol/L", "µmol/L", "umol/l")
# pressure, base mmHg
_add("pressure", 1.0, "mm[Hg]", "mmHg", "mm Hg")
_add("pressure", 7.500616827, "kPa")
# frequency (heart rate), base 1/min
_add("frequency", 1.0, "/min", "1/min", "{beats}/min", "beats/min", "bpm")
_add("frequency", 1.0 / 60.0, "/h", "1/h")
# amount (doses), base mg
_add("mass", 1.0, "mg")
_add("mass", 1e3, "g")
_add("mass", 1e-3, "ug", "µg", "mcg")
# insulin amount, base U
_add("insulin", 1.0, "U", "[iU]", "IU")
# time, base h
_add("time", 1.0, "h", "hr", "hour")
_add("time", 1.0 / 60.0, "min")
_add("time", 1.0 / 3600.0, "s")
_add("time", 24.0, "d", "day")
# dimensionless
_add("one", 1.0, "1", "")
_add("one", 0.01, "%")


class UnitError(ValueError):
    pass


def known(unit: str) -> bool:
    return unit in _UNITS


def factor(src: str, dst: str, molar_mass: float | None = None) -> float:
    """Multiplier taking a value in `src` to `dst`; UnitError if they do not convert."""
    if src not in _UNITS:
        raise UnitError(f"unknown unit {src!r}")
    if dst not in _UNITS:
        raise UnitError(f"unknown target unit {dst!r}")
    (ds, fs), (dd, fd) = _UNITS[src], _UNITS[dst]
    if ds == dd:
        return fs / fd
    if molar_mass is not None and {ds, dd} == {"mass_conc", "molar_conc"}:
        # mmol/L * g/mol = mg/L
        return fs * molar_mass / fd if ds == "molar_conc" else fs / molar_mass / fd
    if {ds, dd} == {"mass_conc", "molar_conc"}:
        raise UnitError(f"unit {src!r} does not convert to {dst!r} without a molar mass for this variable")
    raise UnitError(f"unit {src!r} ({ds}) does not convert to {dst!r} ({dd})")
