"""SBML import against the SBML Test Suite (semantic cases), run with the NumPy integrator.

Shipped cases live in tests/data/sbml/cases/NNNNN/ (see tests/data/sbml/SOURCES.md); every case of
the selected range that the importer refuses is listed with its reason in
tests/data/sbml/SUPPORT.md, and each refusal is checked to be a ValueError naming the feature.

Regenerate the data and SUPPORT.md from a checkout (a bare git dir is fine) of
github.com/sbmlteam/sbml-test-suite with:

    python tests/test_sbml.py refresh /path/to/sbml-test-suite/.git
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

libsbml = pytest.importorskip("libsbml") if __name__ != "__main__" else None

from kernels.compile import ode_kernel  # noqa: E402
from kernels.ode.codegen_numpy import generate  # noqa: E402
from kernels.ode.integrate_numpy import Events, SolverOptions  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "sbml"
CASES = DATA / "cases"
SUPPORT = DATA / "SUPPORT.md"
RTOL, ATOL = 1e-10, 1e-14
XML_PREFERENCE = ("l3v2", "l3v1", "l2v5", "l2v4", "l2v3", "l2v2", "l2v1", "l1v2")
# the test suite marks these in NNNNN-model.m; the importer must refuse them (or the case is skipped)
NON_ODE_TAGS = {"EventNoDelay", "EventWithDelay", "EventPriority", "EventT0Firing", "EventIsPersistent",
                "EventIsNotPersistent", "EventUsesTriggerTimeValues", "EventUsesAssignmentTimeValues",
                "RandomEventExecution", "DelayInTrigger", "DelayInEventAssignment", "AlgebraicRule",
                "CSymbolDelay", "FastReaction", "MultipleFastReactions", "comp"}


# ------------------------------------------------------------------------------------- harness
def read_settings(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    lists = ("variables", "amount", "concentration")
    for k in lists:
        out[k] = [x.strip() for x in out.get(k, "").split(",") if x.strip()]
    for k in ("start", "duration", "absolute", "relative"):
        out[k] = float(out[k])
    out["steps"] = int(out["steps"])
    return out


def read_results(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open() as f:
        rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]]
    vals = np.array([[float(x) for x in r] for r in rows[1:] if r], dtype=float)
    return header, vals


def case_xml(d: Path) -> Path:
    xs = sorted(d.glob("*-sbml-*.xml"))
    if len(xs) != 1:
        raise FileNotFoundError(f"{d}: expected one SBML file, found {len(xs)}")
    return xs[0]


def simulate(imp, variables: list[str], amount: list[str], conc: list[str], times: np.ndarray,
             backend: str = "numpy") -> np.ndarray:
    """Values [T, len(variables)] of an imported model at `times` (one patient, default parameters)."""
    model = imp.model
    record = [imp.output_for(v, "amount" if v in amount else "concentration" if v in conc else "") for v in variables]
    p = np.array([[x.default] for x in model.parameters], dtype=float).reshape(len(model.parameters), 1)
    times = np.asarray(times, float)
    if not model.states:  # nothing to integrate: outputs are functions of time and parameters only
        gen = generate(model)
        none = np.zeros((0, times.size))
        outs = gen.outputs(times, none, np.repeat(p, times.size, axis=1), none)
        return np.array([outs[model.output_names.index(r)] for r in record], dtype=float).reshape(len(record), -1).T
    kernel = ode_kernel(model, backend)
    opts = SolverOptions(rtol=RTOL, atol=ATOL, max_steps=2_000_000)
    samples, status = kernel.run(p, Events.empty(1), times, opts, record, np.zeros(1, np.int8))
    if status[0] != 0:
        raise RuntimeError(f"integration failed with status {int(status[0])}")
    return samples[:, 0, :].T


def run_case(d: Path) -> tuple[bool, str]:
    """(passed, message) for the case in directory d, using the suite's own criterion."""
    from kernels.ode.sbml import import_sbml_mapped

    n = d.name
    s = read_settings(d / f"{n}-settings.txt")
    header, expected = read_results(d / f"{n}-results.csv")
    times = expected[:, 0]
    imp = import_sbml_mapped(case_xml(d))
    variables = header[1:]
    with np.errstate(all="ignore"):
        sim = simulate(imp, variables, s["amount"], s["concentration"], times)
    exp = expected[:, 1:]
    tol = s["absolute"] + s["relative"] * np.abs(exp)
    with np.errstate(invalid="ignore"):  # inf - inf where the expected value is infinite
        diff = np.abs(sim - exp)
    ok = (diff <= tol) | (np.isnan(exp) & np.isnan(sim)) | (np.isinf(exp) & (sim == exp))
    if ok.all():
        return True, "ok"
    i, j = np.argwhere(~ok)[0]
    return False, (f"{(~ok).sum()} of {ok.size} values outside tolerance; first: {variables[j]} at t={times[i]}: "
                   f"simulated {sim[i, j]!r}, expected {exp[i, j]!r}")


def read_support() -> list[tuple[str, str, str]]:
    rows = []
    for line in SUPPORT.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| case") and not line.startswith("| ---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            rows.append((cells[0], cells[1], cells[2].replace("\\|", "|")))
    return rows


def shipped_cases() -> list[Path]:
    return sorted(p for p in CASES.iterdir() if p.is_dir()) if CASES.is_dir() else []


# --------------------------------------------------------------------------------------- tests
SHIPPED = shipped_cases()
SUPPORTED = [d for d in SHIPPED if (d / f"{d.name}-results.csv").exists()]
SUPPORT_ROWS = read_support() if SUPPORT.exists() else []
UNSUPPORTED = [(c, r) for c, status, r in SUPPORT_ROWS if status == "unsupported" and (CASES / c).is_dir()]
_results: dict[str, bool] = {}


@pytest.mark.parametrize("case", SUPPORTED, ids=[d.name for d in SUPPORTED])
def test_sbml_case(case: Path):
    passed, msg = run_case(case)
    _results[case.name] = passed
    assert passed, f"case {case.name}: {msg}"


def test_sbml_pass_rate():
    assert SUPPORTED, "no shipped SBML cases"
    t0 = time.perf_counter()
    todo = [d for d in SUPPORTED if d.name not in _results]
    for d in todo:
        try:
            _results[d.name] = run_case(d)[0]
        except Exception:
            _results[d.name] = False
    passed = sum(_results[d.name] for d in SUPPORTED)
    rate = passed / len(SUPPORTED)
    refused = sum(1 for _, st, _ in SUPPORT_ROWS if st == "unsupported")
    print(f"\nSBML test suite: {passed}/{len(SUPPORTED)} shipped cases pass ({100 * rate:.1f}%); "
          f"{refused} cases of the selected ranges unsupported ({len(UNSUPPORTED)} refusals tested); "
          f"{len(todo)} cases run here in {time.perf_counter() - t0:.1f} s")
    failing = sorted(d.name for d in SUPPORTED if not _results[d.name])
    assert rate == 1.0, f"failing cases: {failing}"


def test_support_table_matches_shipped():
    shipped = {d.name for d in SUPPORTED}
    assert {c for c, s, _ in SUPPORT_ROWS if s == "pass"} == shipped
    assert all(s in ("pass", "unsupported", "out of scope") for _, s, _ in SUPPORT_ROWS)
    # every shipped directory is in the table; refused ones carry no results
    assert {d.name for d in SHIPPED} <= {c for c, _, _ in SUPPORT_ROWS}
    assert all(not (CASES / c / f"{c}-results.csv").exists() for c, _ in UNSUPPORTED)


@pytest.mark.parametrize("case,reason", UNSUPPORTED, ids=[c for c, _ in UNSUPPORTED])
def test_unsupported_case_is_refused(case: str, reason: str):
    from kernels.ode.sbml import import_sbml

    d = CASES / case
    with pytest.raises(ValueError) as e:
        import_sbml(case_xml(d))
    msg = str(e.value)
    assert msg.startswith("unsupported SBML feature: "), msg
    assert reason in msg, (reason, msg)


# ----------------------------------------------------------------------- importer API checks
def _sbml(body: str) -> str:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<sbml xmlns="http://www.sbml.org/sbml/level3/version2/core" level="3" version="2">'
            f'<model id="m">{body}</model></sbml>')


_MATH = 'xmlns="http://www.w3.org/1998/Math/MathML"'
_DECAY = (
    '<listOfCompartments><compartment id="V" spatialDimensions="3" size="2" constant="true"/></listOfCompartments>'
    '<listOfSpecies><species id="lambda" compartment="V" initialAmount="4" hasOnlySubstanceUnits="false"'
    ' boundaryCondition="false" constant="false"/></listOfSpecies>'
    '<listOfParameters><parameter id="k" value="0.5" constant="true"/></listOfParameters>'
    '<listOfReactions><reaction id="R" reversible="false"><listOfReactants>'
    '<speciesReference species="lambda" stoichiometry="1" constant="true"/></listOfReactants>'
    f'<kineticLaw><math {_MATH}><apply><times/><ci>k</ci><ci>lambda</ci><ci>V</ci></apply></math>'
    '</kineticLaw></reaction></listOfReactions>'
)


def test_import_from_string_renames_reserved_ids():
    from kernels.ode.sbml import import_sbml_mapped

    imp = import_sbml_mapped(_sbml(_DECAY))
    m = imp.model
    # 'lambda' (a Python keyword) and 'k' (reserved by the code generators) are renamed
    assert imp.names["lambda"] != "lambda" and imp.names["k"] != "k"
    assert imp.names["lambda"] in m.state_names
    assert {imp.output_for("lambda", "amount"), imp.output_for("lambda", "concentration")} <= set(m.output_names)
    times = np.array([0.0, 1.0, 2.0])
    vals = simulate(imp, ["lambda"], ["lambda"], [], times)[:, 0]
    np.testing.assert_allclose(vals, 4 * np.exp(-0.5 * times), rtol=1e-8)


def test_import_refuses_events_by_name():
    from kernels.ode.sbml import import_sbml

    event = (f'<listOfEvents><event useValuesFromTriggerTime="true"><trigger initialValue="true" persistent="true">'
             f'<math {_MATH}><apply><gt/><csymbol encoding="text" '
             f'definitionURL="http://www.sbml.org/sbml/symbols/time">t</csymbol><cn>1</cn></apply></math></trigger>'
             '</event></listOfEvents>')
    with pytest.raises(ValueError, match="unsupported SBML feature: events"):
        import_sbml(_sbml(_DECAY + event))


def test_import_rejects_invalid_sbml():
    from kernels.ode.sbml import import_sbml

    with pytest.raises(ValueError, match="invalid SBML"):
        import_sbml("<sbml><model></sbml>")


# ------------------------------------------------------------------------ refreshing the data
RANGES = ((1, 200), (901, 1822))  # core cases, then the cases exercising SBML Level 3 features
MAX_REFUSED_XML = 20_000  # bytes; larger SBML files of refused cases are listed but not shipped


def _git(gitdir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", gitdir, *args], check=True, capture_output=True, text=True).stdout


def _tags(model_m: str) -> tuple[set[str], str]:
    """(component, test and package tags, test type) from a case's NNNNN-model.m header."""
    tags, ttype = set(), ""
    for line in model_m.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key in ("componentTags", "testTags", "packagesPresent"):
            tags |= {t.strip() for t in val.split(",") if t.strip()}
        elif key == "testType":
            ttype = val.strip()
    return tags, ttype


def refresh(gitdir: str, ranges=RANGES) -> None:
    """Copy the selected cases from the suite: supported ones in full, refused ones as SBML only."""
    import shutil

    from kernels.ode.sbml import import_sbml_mapped

    commit = _git(gitdir, "rev-parse", "HEAD").strip()
    if CASES.exists():
        shutil.rmtree(CASES)
    rows = []
    for first, last in ranges:
        for k in range(first, last + 1):
            n = f"{k:05d}"
            base = f"cases/semantic/{n}"
            names = [f.rsplit("/", 1)[1] for f in _git(gitdir, "ls-tree", "--name-only", "HEAD", base + "/").split()]
            if not names:
                continue
            xml = next((f"{n}-sbml-{v}.xml" for v in XML_PREFERENCE if f"{n}-sbml-{v}.xml" in names), None)
            tags, ttype = _tags(_git(gitdir, "show", f"HEAD:{base}/{n}-model.m"))
            non_ode = sorted(tags & NON_ODE_TAGS)
            if ttype != "TimeCourse":
                rows.append((n, "out of scope", f"test type {ttype}", "", non_ode))
                continue
            text = _git(gitdir, "show", f"HEAD:{base}/{xml}")
            d = CASES / n
            d.mkdir(parents=True)
            (d / xml).write_text(text)
            try:
                import_sbml_mapped(d / xml)
                status, reason = "pass", ""
            except ValueError as e:
                status, reason = "unsupported", str(e)
            if status == "pass":
                if non_ode:
                    raise SystemExit(f"case {n} is tagged {non_ode} but was imported")
                for f in (f"{n}-settings.txt", f"{n}-results.csv"):
                    (d / f).write_text(_git(gitdir, "show", f"HEAD:{base}/{f}"))
                passed, msg = run_case(d)
                if not passed:
                    raise SystemExit(f"case {n} imports but fails: {msg}")
            elif reason.startswith("unsupported SBML feature: "):
                reason = reason.removeprefix("unsupported SBML feature: ").split(" (")[0]
                if len(text.encode()) > MAX_REFUSED_XML:
                    shutil.rmtree(d)
                    xml = f"(not shipped: {len(text.encode()) // 1000} kB)"
            else:
                raise SystemExit(f"case {n} refused without naming an unsupported feature: {reason}")
            rows.append((n, status, reason, xml, non_ode))
            print(n, status, reason)
    counts: dict[str, int] = {}
    for _, st, r, _, _ in rows:
        key = "pass" if st == "pass" else f"{st}: {r}"
        counts[key] = counts.get(key, 0) + 1
    span = ", ".join(f"{a:05d}-{b:05d}" for a, b in ranges)
    lines = [
        "# SBML Test Suite: support of the selected cases",
        "",
        f"Generated by `python tests/test_sbml.py refresh` from sbmlteam/sbml-test-suite commit",
        f"{commit}, semantic cases {span}.",
        "",
        "* `pass`: shipped with settings and results; tests/test_sbml.py imports, simulates (NumPy, rtol",
        "  1e-10, atol 1e-14) and compares every value with the suite's criterion.",
        "* `unsupported`: the importer raises a ValueError naming the feature (the reason column);",
        f"  the SBML file is shipped and the refusal tested when it is at most {MAX_REFUSED_XML // 1000} kB.",
        "* `out of scope`: not a deterministic time course (e.g. flux balance steady state).",
        "",
        "The last column lists the case's suite tags that put it outside the ODE subset (events,",
        "algebraic rules, delays, fast reactions, packages); a case with such a tag must be refused.",
        "",
        "Totals: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "",
        "| case | status | reason | file | non-ODE tags |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n, st, r, xml, tg in rows:
        lines.append(f"| {n} | {st} | {r.replace('|', chr(92) + '|')} | {xml} | {', '.join(tg)} |")
    SUPPORT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "refresh":
        refresh(sys.argv[2])
    else:
        raise SystemExit(__doc__)
