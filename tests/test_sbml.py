"""SBML import against the SBML Test Suite (semantic cases), run with the NumPy integrator.

Shipped cases live in tests/data/sbml/cases/NNNNN/ (see tests/data/sbml/SOURCES.md); every case of
the selected range that the importer refuses is listed with its reason in
tests/data/sbml/SUPPORT.md, and each refusal is checked to be a ValueError naming the feature.

Regenerate the data and SUPPORT.md from a checkout (a bare git dir is fine) of
github.com/sbmlteam/sbml-test-suite with:

    python tests/test_sbml.py refresh /path/to/sbml-test-suite/.git [first last]
"""

from __future__ import annotations

import csv
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

from kernels.ode.codegen_numpy import generate  # noqa: E402
from kernels.ode.integrate_numpy import Events, SolverOptions, integrate  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "sbml"
CASES = DATA / "cases"
SUPPORT = DATA / "SUPPORT.md"
RTOL, ATOL = 1e-10, 1e-14
XML_PREFERENCE = ("l3v2", "l3v1", "l2v5", "l2v4", "l2v3", "l2v2", "l2v1", "l1v2")
# the test suite marks these in NNNNN-model.m; the importer must refuse them (or the case is skipped)
NON_ODE_TAGS = {"EventNoDelay", "EventWithDelay", "EventPriority", "EventT0Firing", "AlgebraicRule",
                "CSymbolDelay", "FastReaction", "RandomEventExecution"}


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


def simulate(imp, variables: list[str], amount: list[str], conc: list[str], times: np.ndarray) -> np.ndarray:
    """Values [T, len(variables)] of an imported model at `times` (one patient, default parameters)."""
    from kernels.ode.sbml import SbmlImport

    assert isinstance(imp, SbmlImport)
    model = imp.model
    gen = generate(model)
    p = np.array([[x.default] for x in model.parameters], dtype=float).reshape(len(model.parameters), 1)
    y0 = gen.init(p)
    outs, st = model.output_names, model.state_names
    picks = []
    for v in variables:
        name = imp.output_for(v, "amount" if v in amount else "concentration" if v in conc else "")
        picks.append(("o", outs.index(name)) if name in outs else ("s", st.index(name)))

    def rec(t, y, pp, u):
        o = gen.outputs(t, y, pp, u)
        return np.array([o[i] if k == "o" else y[i] for k, i in picks]).reshape(len(picks), -1)

    if not st:  # nothing to integrate: outputs are functions of time and parameters only
        tt = np.asarray(times, float)
        vals = rec(tt, np.zeros((0, tt.size)), np.repeat(p, tt.size, axis=1), np.zeros((0, tt.size)))
        return vals.T
    opts = SolverOptions(rtol=RTOL, atol=ATOL, max_steps=2_000_000)
    samples, status = integrate(gen.rhs, rec, y0, p, 0, Events.empty(1), np.asarray(times, float), opts)
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
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.append((cells[0], cells[1], cells[2].replace("\\|", "|")))
    return rows


def shipped_cases() -> list[Path]:
    return sorted(p for p in CASES.iterdir() if p.is_dir()) if CASES.is_dir() else []


# --------------------------------------------------------------------------------------- tests
SHIPPED = shipped_cases()
SUPPORTED = [d for d in SHIPPED if (d / f"{d.name}-results.csv").exists()]
UNSUPPORTED = [(c, r) for c, status, r in read_support() if status == "unsupported"] if SUPPORT.exists() else []
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
    print(f"\nSBML test suite: {passed}/{len(SUPPORTED)} shipped cases pass ({100 * rate:.1f}%), "
          f"{len(UNSUPPORTED)} cases of the selected range unsupported; "
          f"{len(todo)} re-run here in {time.perf_counter() - t0:.1f} s")
    failing = sorted(d.name for d in SUPPORTED if not _results[d.name])
    assert rate == 1.0, f"failing cases: {failing}"


def test_support_table_matches_shipped():
    rows = read_support()
    shipped = {d.name for d in SUPPORTED}
    assert {c for c, s, _ in rows if s == "pass"} == shipped
    assert all(s in ("pass", "unsupported") for _, s, _ in rows)


@pytest.mark.parametrize("case,reason", UNSUPPORTED, ids=[c for c, _ in UNSUPPORTED])
def test_unsupported_case_is_refused(case: str, reason: str):
    from kernels.ode.sbml import import_sbml

    d = CASES / case
    with pytest.raises(ValueError) as e:
        import_sbml(case_xml(d))
    msg = str(e.value)
    assert msg.startswith("unsupported SBML feature: "), msg
    assert reason in msg, (reason, msg)


# ------------------------------------------------------------------------ refreshing the data
def _git(gitdir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", gitdir, *args], check=True, capture_output=True, text=True).stdout


def _tags(model_m: str) -> set[str]:
    tags, cur = set(), None
    for line in model_m.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("componentTags", "testTags", "testType"):
            cur = key
            tags |= {t.strip() for t in line.split(":", 1)[1].split(",") if t.strip()}
        elif cur and line.startswith(" ") and ":" not in line and line.strip():
            tags |= {t.strip() for t in line.split(",") if t.strip()}
        else:
            cur = None
    return tags


def refresh(gitdir: str, first: int = 1, last: int = 200) -> None:
    """Copy cases [first, last] from the suite: supported ones in full, refused ones as SBML only."""
    import shutil

    from kernels.ode.sbml import import_sbml_mapped

    commit = _git(gitdir, "rev-parse", "HEAD").strip()
    if CASES.exists():
        shutil.rmtree(CASES)
    rows = []
    for k in range(first, last + 1):
        n = f"{k:05d}"
        base = f"cases/semantic/{n}"
        files = _git(gitdir, "ls-tree", "--name-only", "HEAD", base + "/").split()
        if not files:
            continue
        names = [f.rsplit("/", 1)[1] for f in files]
        xml = next((f"{n}-sbml-{v}.xml" for v in XML_PREFERENCE if f"{n}-sbml-{v}.xml" in names), None)
        tags = _tags(_git(gitdir, "show", f"HEAD:{base}/{n}-model.m"))
        d = CASES / n
        d.mkdir(parents=True)
        (d / xml).write_text(_git(gitdir, "show", f"HEAD:{base}/{xml}"))
        try:
            import_sbml_mapped(d / xml)
            status, reason = "pass", ""
        except ValueError as e:
            status, reason = "unsupported", str(e)
        if status == "pass":
            for f in (f"{n}-settings.txt", f"{n}-results.csv"):
                (d / f).write_text(_git(gitdir, "show", f"HEAD:{base}/{f}"))
            passed, msg = run_case(d)
            if not passed:
                raise SystemExit(f"case {n} imports but fails: {msg}")
        elif tags & NON_ODE_TAGS or "unsupported SBML feature" in reason:
            feature = reason.split("(")[0].replace("unsupported SBML feature:", "").strip()
            reason = feature
        else:
            raise SystemExit(f"case {n} refused without naming an unsupported feature: {reason}")
        rows.append((n, status, reason, xml, sorted(tags & NON_ODE_TAGS)))
        print(n, status, reason)
    counts: dict[str, int] = {}
    for _, s, r, _, _ in rows:
        counts[r or "pass"] = counts.get(r or "pass", 0) + 1
    lines = [
        "# SBML test suite: support of the selected cases",
        "",
        f"Generated by `python tests/test_sbml.py refresh` from sbmlteam/sbml-test-suite commit {commit},",
        f"semantic cases {first:05d}-{last:05d}. `pass`: shipped with settings and results and checked by",
        "tests/test_sbml.py; `unsupported`: the importer raises a ValueError naming the feature (the SBML",
        "file is shipped so the refusal is tested).",
        "",
        "Totals: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])),
        "",
        "| case | status | reason | file | suite tags |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n, s, r, xml, tg in rows:
        lines.append(f"| {n} | {s} | {r.replace('|', chr(92) + '|')} | {xml} | {', '.join(tg)} |")
    SUPPORT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "refresh":
        rng = [int(x) for x in sys.argv[3:5]] or [1, 200]
        refresh(sys.argv[2], *rng)
    else:
        raise SystemExit(__doc__)
