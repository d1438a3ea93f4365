"""Reading a run's result: one lazy xarray Dataset, a text summary and percentile-band plots.

`open_run(path)` opens `RUN.h5` (or the run directory holding it) as ONE Dask-backed
`xarray.Dataset` (chunked along `patient`):

* root variables keep their names: outputs `(patient, time)`, `status`, `arm`; coordinates
  `patient` and `time` (with its `units`); the root attributes (provenance) are the Dataset's attrs;
* `cohort/<name>` and `biomarkers/<name>` are merged in under their own names (`weight`, `cmax`);
  only where a name is already taken (by a root variable, a coordinate, or — for biomarkers — a
  cohort variable) it gets a prefix: `cohort_<name>` for cohort variables, `bm_<name>` for
  biomarkers;
* every data variable carries the attribute `h5_path` with its path in the file (`"C"`,
  `"cohort/weight"`, `"biomarkers/cmax"`), so the group a variable came from is never lost, whatever
  its name in the Dataset.

Nothing is read until `.compute()` / `.values` (the `patient`/`time` index coordinates excepted).

`summary_table(path)` computes everything `summary` prints in ONE `dask.compute`: per arm (and
"all arms" when there are several) the number of patients, ok and failed ones (by failure reason);
for each biomarker, and for each output at the last time and at the time of its maximum mean, the
number of values, mean and 5th/50th/95th percentiles over the ok patients (status == 0; failed
patients are masked to NaN and NaNs are skipped).

Percentiles are exact: for each arm the masked variable is rechunked to ONE chunk along `patient`
(outputs stay chunked along `time`, about 64 MiB per block) and `xarray.DataArray.quantile` runs
`numpy.nanquantile` (method "linear", numpy's default) on whole columns inside Dask. There is no
merge/approximation across patient chunks (unlike `dask.array.percentile`), so the values equal
`numpy.nanpercentile` over the ok patients; means are Dask's chunked nan-sums (equal to numpy's up to
floating-point summation order, ~1e-16 relative).

`report(path, out_dir)` writes PNGs (matplotlib's Agg canvas; pyplot's global state is not touched).
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError

MASTER = "RUN.h5"
LAYOUT_ATTR = "twin_layout"
GROUP_PREFIX = {"cohort": "cohort_", "biomarkers": "bm_"}
ALL_ARMS = "all arms"  # label of the pooled row; arm names are single tokens, so it cannot clash
SUMMARY_QUANTILES = (0.05, 0.5, 0.95)
REPORT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_TARGET_ELEMS = 1 << 23  # ~64 MiB of float64 per Dask block


# ------------------------------------------------------------------------------------ open
def _master_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / MASTER
    if not p.exists():
        raise StoreError(f"{p} does not exist: no run result there (run `twin run` to completion first)")
    if not p.is_file():
        raise StoreError(f"{p} is not a file")
    return p


def _vds_search_dirs(master: Path) -> list[Path]:
    """Where HDF5 looks for a relative virtual-dataset source: $HDF5_VDS_PREFIX, the master's
    directory, the current directory."""
    dirs = []
    for pre in filter(None, os.environ.get("HDF5_VDS_PREFIX", "").split(os.pathsep)):
        dirs.append(Path(pre.replace("${ORIGIN}", str(master.parent))))
    dirs += [master.parent, Path.cwd()]
    return dirs


def _check_master(p: Path) -> dict:
    """Open the file with h5py first: a corrupt file, a file that is no run result, or a missing /
    unreadable shard gives a StoreError here (HDF5 would silently read fill values for a missing
    virtual-dataset source). Returns what `open_run` needs to choose chunks."""
    import h5py

    # default file locking, as h5netcdf uses: HDF5 refuses a second open of a file that is already
    # open in this process (e.g. a Dataset from an earlier open_run) with different locking flags
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise StoreError(f"{p} is not a readable HDF5 file ({_short(e)}); the run result is corrupt") from None
    try:
        for name in ("patient", "time"):
            if not isinstance(f.get(name), h5py.Dataset):
                raise StoreError(f"{p} is not a twin run result (no /{name} dimension scale)")
        info = {
            "n": int(f["patient"].shape[0]),
            "t": int(f["time"].shape[0]),
            "groups": [g for g in GROUP_PREFIX if isinstance(f.get(g), h5py.Group)],
            "chunk_size": None,
        }
        lay = f.attrs.get(LAYOUT_ATTR)
        if lay is not None:
            import json

            try:
                info["chunk_size"] = int(json.loads(lay)["chunk_size"])
            except Exception:
                pass
        # virtual datasets: every source file must exist and open
        sources: dict[str, str] = {}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and obj.is_virtual:
                dcpl = obj.id.get_create_plist()
                for i in range(dcpl.get_virtual_count()):
                    sources.setdefault(dcpl.get_virtual_filename(i), name)

        f.visititems(visit)
    finally:
        f.close()
    dirs = _vds_search_dirs(p)
    for src, used_by in sorted(sources.items()):
        if src == ".":
            continue
        cands = [Path(src)] if os.path.isabs(src) else [d / src for d in dirs]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise StoreError(f"{p}: shard {src} (data of /{used_by}) is missing; the run directory is incomplete")
        try:
            h5py.File(found, "r").close()
        except OSError as e:
            if "locking" in str(e):  # already open in this process (other flags): it exists and opens
                continue
            raise StoreError(f"{p}: shard {found} is unreadable ({_short(e)}); the run result is corrupt") from None
    return info


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


def _patient_chunk(info: dict, chunks: int | None) -> int:
    n, t = max(info["n"], 1), max(info["t"], 1)
    if chunks is not None:
        if int(chunks) < 1:
            raise ValueError("chunks must be >= 1")
        return min(int(chunks), n)
    rows = max(1, _TARGET_ELEMS // t)
    cs = info["chunk_size"]
    if cs and cs > 0:  # whole store chunks per Dask block
        rows = max(cs, rows // cs * cs)
    return min(rows, n)


def open_run(path: str | os.PathLike, chunks: int | None = None):
    """The run's result as one Dask-backed xarray.Dataset (see the module docstring for names).

    `path` is RUN.h5 or a run directory holding it. `chunks` is the number of patients per Dask
    block (default: whole store chunks, about 64 MiB per output block). Missing or corrupt file,
    missing shard: StoreError with a one-line message naming the path.
    """
    import xarray as xr

    p = _master_path(path)
    info = _check_master(p)
    kw = dict(
        engine="h5netcdf",
        chunks={"patient": _patient_chunk(info, chunks)},
        decode_times=False,  # times/durations stay numbers in the file's units
        decode_timedelta=False,
    )
    parts = []
    try:
        root = xr.open_dataset(p, **kw)
        parts.append(root)
        for name in root.data_vars:
            root[name].attrs["h5_path"] = name
        taken = set(root.variables) | set(root.dims)
        new_vars = {}
        for group in info["groups"]:
            g = xr.open_dataset(p, group=group, **kw)
            parts.append(g)
            for name, var in g.data_vars.items():
                key = name if name not in taken else GROUP_PREFIX[group] + name
                if key in taken:
                    raise StoreError(f"{p}: cannot merge /{group}/{name}: both {name} and {key} are taken")
                taken.add(key)
                var = var.copy(deep=False)
                var.attrs["h5_path"] = f"{group}/{name}"
                new_vars[key] = var
        ds = root.assign(new_vars) if new_vars else root
    except StoreError:
        for d in parts:
            d.close()
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        for d in parts:
            d.close()
        raise StoreError(f"{p} cannot be read as a run result ({_short(e)})") from None

    def close() -> None:
        for d in parts:
            d.close()

    ds.set_close(close)
    ds.encoding["source"] = str(p)
    return ds


# ------------------------------------------------------------------------------------ helpers
def flags(var) -> dict[int, str]:
    """{code: meaning} from CF flag_values / flag_meanings attributes ({} if absent)."""
    vals = var.attrs.get("flag_values")
    means = var.attrs.get("flag_meanings")
    if vals is None or means is None:
        return {}
    if isinstance(means, bytes):
        means = means.decode("utf-8", "replace")
    return {int(v): str(m) for v, m in zip(np.atleast_1d(vals), str(means).split())}


def output_names(ds) -> list[str]:
    """Root float variables over (patient, time): the model outputs."""
    return [
        k for k, v in ds.data_vars.items()
        if "/" not in str(v.attrs.get("h5_path", k)) and v.dims == ("patient", "time") and v.dtype.kind == "f"
    ]


def biomarker_names(ds) -> list[str]:
    return [k for k, v in ds.data_vars.items() if str(v.attrs.get("h5_path", "")).startswith("biomarkers/")]


def _attr(ds, key: str, default: Any = None) -> Any:
    v = ds.attrs.get(key, default)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        v = v.item()
    return v


def _arms(ds) -> tuple[dict[int, str], Any]:
    """({code: name}, lazy arm DataArray or None). Without flag metadata the codes are found with
    one extra (small) computation over `arm`."""
    if "arm" not in ds:
        return {0: ALL_ARMS}, None
    arm = ds["arm"]
    names = flags(arm)
    if not names:
        names = {int(c): f"arm{int(c)}" for c in np.unique(arm.values)}
    return names, arm


def _groups(ds, with_all: bool):
    """[(label, lazy bool DataArray over patient)] for each arm (and pooled)."""
    names, arm = _arms(ds)
    if arm is None:
        return [(ALL_ARMS, None)]
    out = [(name, arm == code) for code, name in names.items()]
    if with_all and len(out) > 1:
        out.append((ALL_ARMS, None))
    return out


def _compute(ds, quantiles: tuple[float, ...], with_all: bool, biomarker_values: bool) -> dict:
    """All reductions of the summary/report, built lazily and computed in ONE dask.compute.

    Returns plain numpy: {"groups": [label...], "status_names": {code: name},
    "counts": {label: {"patients", "ok", "failed", code...}},
    "bm": {label: {name: {"n", "mean", "q"}}}, "out": {label: {name: {"n" [T], "mean" [T], "q" [nq, T]}}},
    "bm_values": {label: {name: ok values}} (if asked)}.
    """
    import dask

    groups = _groups(ds, with_all)
    status = ds["status"] if "status" in ds else None
    status_names = flags(status) if status is not None else {}
    outs, bms = output_names(ds), biomarker_names(ds)
    n_pat = ds.sizes["patient"]
    t_chunk = max(1, min(ds.sizes.get("time", 1), _TARGET_ELEMS // max(n_pat, 1)))
    q = list(quantiles)

    lazy: dict = {"counts": {}, "bm": {}, "out": {}, "bm_values": {}}
    for label, in_g in groups:
        ok = None
        if status is not None:
            ok = status == 0
            if in_g is not None:
                ok = ok & in_g
        elif in_g is not None:
            ok = in_g
        c: dict = {}
        c["patients"] = in_g.sum() if in_g is not None else n_pat
        if status is not None:
            failed = status != 0
            c["failed"] = (failed & in_g).sum() if in_g is not None else failed.sum()
            for code in status_names:
                if code != 0:
                    hit = status == code
                    c[code] = (hit & in_g).sum() if in_g is not None else hit.sum()
        lazy["counts"][label] = c

        def masked(name):
            v = ds[name]
            return v.where(ok) if ok is not None else v

        lazy["bm"][label] = {}
        lazy["bm_values"][label] = {}
        for b in bms:
            x = masked(b)
            lazy["bm"][label][b] = {
                "n": x.count("patient"),
                "mean": x.mean("patient", skipna=True),
                "q": x.chunk({"patient": -1}).quantile(q, dim="patient", skipna=True, method="linear"),
            }
            if biomarker_values:
                lazy["bm_values"][label][b] = x
        lazy["out"][label] = {}
        for o in outs:
            x = masked(o)
            lazy["out"][label][o] = {
                "n": x.count("patient"),
                "mean": x.mean("patient", skipna=True),
                "q": x.chunk({"patient": -1, "time": t_chunk}).quantile(q, dim="patient", skipna=True, method="linear"),
            }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"All-NaN slice", RuntimeWarning)
        warnings.filterwarnings("ignore", r"Mean of empty slice", RuntimeWarning)
        warnings.filterwarnings("ignore", r"invalid value encountered", RuntimeWarning)
        try:
            (res,) = dask.compute(lazy)
        except OSError as e:
            src = ds.encoding.get("source", "the run result")
            raise StoreError(f"{src}: reading failed ({_short(e)}); the run result is corrupt") from None

    def arr(v):
        return np.asarray(getattr(v, "values", v))

    out = {"groups": [g for g, _ in groups], "status_names": status_names, "counts": {}, "bm": {}, "out": {},
           "bm_values": {}}
    for label in out["groups"]:
        out["counts"][label] = {k: int(arr(v)) for k, v in res["counts"][label].items()}
        out["bm"][label] = {b: {k: arr(v) for k, v in d.items()} for b, d in res["bm"][label].items()}
        out["out"][label] = {o: {k: arr(v) for k, v in d.items()} for o, d in res["out"][label].items()}
        if biomarker_values:
            out["bm_values"][label] = {b: (lambda a: a[np.isfinite(a)])(arr(v)) for b, v in res["bm_values"][label].items()}
    return out


# ------------------------------------------------------------------------------------ summary
SUMMARY_COLUMNS = ["arm", "kind", "variable", "units", "when", "time", "n", "mean", "p5", "p50", "p95"]


def summary_table(path: str | os.PathLike, chunks: int | None = None):
    """The numbers `summary` prints, as a tidy pandas.DataFrame (one dask.compute).

    Columns: arm (arm name or "all arms"), kind ("count" | "biomarker" | "output"), variable,
    units, when ("" | "last" | "max mean" | "last, max mean"), time (outputs only, else NaN), n, mean,
    p5, p50, p95.

    * kind "count": variable "patients", "ok", "failed" or "failed:<reason>" (one per non-zero
      status flag); n is the count; the statistics are NaN.
    * kind "biomarker": statistics over the arm's ok patients (status == 0, NaN values skipped);
      n = number of values used.
    * kind "output": the same at the last sample time and at the time where the mean over ok
      patients is largest (one row if both coincide).
    """
    ds = open_run(path, chunks=chunks)
    try:
        return _summary_frame(ds)
    finally:
        ds.close()


def _summary_frame(ds):
    import pandas as pd

    st = _compute(ds, SUMMARY_QUANTILES, with_all=True, biomarker_values=False)
    time = np.asarray(ds["time"].values, dtype=float)
    units = {k: str(ds[k].attrs.get("units", "") or "") for k in ds.variables}
    rows = []
    for label in st["groups"]:
        c = st["counts"][label]
        n_pat = c["patients"]
        n_fail = c.get("failed", 0)
        rows.append(dict(arm=label, kind="count", variable="patients", n=n_pat))
        rows.append(dict(arm=label, kind="count", variable="ok", n=n_pat - n_fail))
        if "failed" in c:
            rows.append(dict(arm=label, kind="count", variable="failed", n=n_fail))
            for code, name in st["status_names"].items():
                if code != 0:
                    rows.append(dict(arm=label, kind="count", variable=f"failed:{name}", n=c[code]))
        for b, d in st["bm"][label].items():
            rows.append(dict(arm=label, kind="biomarker", variable=b, units=units.get(b, ""), n=int(d["n"]),
                             mean=float(d["mean"]), p5=float(d["q"][0]), p50=float(d["q"][1]), p95=float(d["q"][2])))
        for o, d in st["out"][label].items():
            mean = d["mean"]
            last = len(time) - 1
            at = {last: ["last"]}
            if np.isfinite(mean).any():
                at.setdefault(int(np.nanargmax(mean)), []).append("max mean")
            for i in sorted(at):
                rows.append(dict(arm=label, kind="output", variable=o, units=units.get(o, ""), when=", ".join(at[i]),
                                 time=float(time[i]), n=int(d["n"][i]), mean=float(mean[i]),
                                 p5=float(d["q"][0, i]), p50=float(d["q"][1, i]), p95=float(d["q"][2, i])))
    df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    df["units"] = df["units"].fillna("")
    df["when"] = df["when"].fillna("")
    df["n"] = df["n"].astype("int64")
    for k in ("time", "mean", "p5", "p50", "p95"):
        df[k] = df[k].astype(float)
    return df


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4g}"


def summary(path: str | os.PathLike, width: int = 120, chunks: int | None = None) -> str:
    """A plain-text report of the run: provenance header and tables (see `summary_table`)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    def row(t, *cells) -> None:  # plain Text cells: names/units like "[mg/L]" are not markup
        t.add_row(*(Text(str(c)) for c in cells))

    p = _master_path(path)
    ds = open_run(p, chunks=chunks)
    try:
        df = _summary_frame(ds)
        attrs = {k: _attr(ds, k) for k in ("job_name", "model", "backend", "device", "ranks", "n_patients",
                                           "n_failed", "n_excluded_no_consent", "seed", "start_time", "end_time")}
        t_units = str(ds["time"].attrs.get("units", "") or "")
    finally:
        ds.close()

    def a(k):
        v = attrs.get(k)
        return "?" if v is None else str(v)

    console = Console(record=True, width=width, file=io.StringIO(), color_system=None, force_terminal=False)
    head = [
        f"run       {p}",
        f"job       {a('job_name')}    model {a('model')}    seed {a('seed')}",
        f"backend   {a('backend')}" + (f" ({a('device')})" if attrs.get("device") else "") + f"    ranks {a('ranks')}",
        f"patients  {a('n_patients')}    failed {a('n_failed')}    excluded without consent {a('n_excluded_no_consent')}",
        f"time      {a('start_time')} .. {a('end_time')}",
    ]
    for line in head:
        console.print(line, highlight=False, markup=False)

    counts = df[df.kind == "count"]
    t = Table(title="Patients by arm", box=box.SIMPLE_HEAD, title_justify="left")
    for col, j in (("arm", "left"), ("patients", "right"), ("ok", "right"), ("failed", "right"),
                   ("failure reasons", "left")):
        t.add_column(col, justify=j)
    for arm, g in counts.groupby("arm", sort=False):
        n = dict(zip(g.variable, g.n))
        reasons = ", ".join(f"{v.split(':', 1)[1]} {k}" for v, k in n.items() if v.startswith("failed:") and k)
        row(t, arm, str(n.get("patients", 0)), str(n.get("ok", 0)), str(n.get("failed", 0)), reasons or "–")
    console.print(t)

    stat_cols = (("n", "right"), ("mean", "right"), ("p5", "right"), ("p50", "right"), ("p95", "right"))
    bms = df[df.kind == "biomarker"]
    if len(bms):
        t = Table(title="Biomarkers over ok patients (mean, 5th/50th/95th percentile)", box=box.SIMPLE_HEAD,
                  title_justify="left")
        t.add_column("arm")
        t.add_column("biomarker")
        for col, j in stat_cols:
            t.add_column(col, justify=j)
        for r in bms.itertuples():
            name = r.variable + (f" [{r.units}]" if r.units else "")
            row(t, r.arm, name, str(r.n), _fmt(r.mean), _fmt(r.p5), _fmt(r.p50), _fmt(r.p95))
        console.print(t)
    outs = df[df.kind == "output"]
    if len(outs):
        t = Table(title="Outputs over ok patients at the last time and at the time of the largest mean",
                  box=box.SIMPLE_HEAD, title_justify="left")
        t.add_column("arm")
        t.add_column("output")
        t.add_column(Text("time" + (f" [{t_units}]" if t_units else "")), justify="right")
        t.add_column("when")
        for col, j in stat_cols:
            t.add_column(col, justify=j)
        for r in outs.itertuples():
            name = r.variable + (f" [{r.units}]" if r.units else "")
            row(t, r.arm, name, _fmt(r.time), r.when, str(r.n), _fmt(r.mean), _fmt(r.p5), _fmt(r.p50), _fmt(r.p95))
        console.print(t)
    text = console.export_text(styles=False)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


# ------------------------------------------------------------------------------------ report
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "var"


def _label(var, name: str) -> str:
    long = str(var.attrs.get("long_name", "") or "")
    units = str(var.attrs.get("units", "") or "")
    s = f"{name} ({long})" if long and long != name else name
    return s + (f" [{units}]" if units else "")


def report(path: str | os.PathLike, out_dir: str | os.PathLike, chunks: int | None = None) -> list[Path]:
    """Write PNG figures of the run into `out_dir` (created if needed); returns their paths.

    * `<output>_bands.png`: per output, median and 25–75 % / 5–95 % percentile bands over time of
      the ok patients, one colour per arm;
    * `bm_<biomarker>_hist.png`: per biomarker, histograms of the ok patients' values per arm
      (shared bins);
    * `status.png`: failed patients per failure reason and arm (only if any patient failed).

    All numbers come from one dask.compute (the percentiles exact, see the module docstring).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    p = _master_path(path)
    ds = open_run(p, chunks=chunks)
    try:
        st = _compute(ds, REPORT_QUANTILES, with_all=False, biomarker_values=True)
        time = np.asarray(ds["time"].values, dtype=float)
        t_units = str(ds["time"].attrs.get("units", "") or "")
        labels = {k: _label(ds[k], k) for k in ds.data_vars}
        job = str(_attr(ds, "job_name", "") or p.parent.name)
    finally:
        ds.close()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create report directory {out_dir}: {e.strerror or e}") from None

    arms = st["groups"]
    colours = [f"C{i % 10}" for i in range(len(arms))]
    written: list[Path] = []

    def save(fig, name: str) -> None:
        FigureCanvasAgg(fig)
        target = out_dir / name
        fig.savefig(target, dpi=110)
        written.append(target)

    i_med = REPORT_QUANTILES.index(0.5)
    for o in (next(iter(st["out"].values())) if st["out"] else {}):
        fig = Figure(figsize=(9, 5.5), layout="constrained")
        ax = fig.add_subplot()
        for arm, col in zip(arms, colours):
            d = st["out"][arm][o]
            qv = d["q"]
            n_ok = st["counts"][arm]["patients"] - st["counts"][arm].get("failed", 0)
            ax.fill_between(time, qv[0], qv[4], color=col, alpha=0.15, linewidth=0)
            ax.fill_between(time, qv[1], qv[3], color=col, alpha=0.35, linewidth=0)
            ax.plot(time, qv[i_med], color=col, linewidth=2, label=f"{arm} (n={n_ok})")
        ax.set_xlabel("time" + (f" [{t_units}]" if t_units else ""))
        ax.set_ylabel(labels.get(o, o))
        ax.set_title(f"{job}: {o} — median, 25–75 % and 5–95 % of ok patients")
        ax.grid(True, alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        handles += [Patch(color="0.5", alpha=0.5, linewidth=0), Patch(color="0.5", alpha=0.2, linewidth=0)]
        names += ["25–75 %", "5–95 %"]
        ax.legend(handles, names, title="arm (ok patients) / band", loc="best")
        save(fig, f"{_safe(o)}_bands.png")

    for b in (next(iter(st["bm_values"].values())) if st["bm_values"] else {}):
        vals = [st["bm_values"][arm][b] for arm in arms]
        allv = np.concatenate(vals) if vals else np.array([])
        fig = Figure(figsize=(8, 5), layout="constrained")
        ax = fig.add_subplot()
        if allv.size:
            lo, hi = float(allv.min()), float(allv.max())
            if lo == hi:
                lo, hi = lo - 0.5, hi + 0.5
            nb = int(min(60, max(10, np.histogram_bin_edges(allv, bins="auto").size - 1)))
            bins = np.linspace(lo, hi, nb + 1)
            for arm, col, v in zip(arms, colours, vals):
                if v.size:
                    ax.hist(v, bins=bins, color=col, alpha=0.4, label=f"{arm} (n={v.size})")
                    ax.hist(v, bins=bins, color=col, histtype="step", linewidth=1.5)
            ax.legend(title="arm", loc="best")
        else:
            ax.text(0.5, 0.5, "no ok patients", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(labels.get(b, b))
        ax.set_ylabel("patients")
        ax.set_title(f"{job}: {b} of ok patients per arm")
        ax.grid(True, alpha=0.3)
        save(fig, f"bm_{_safe(b)}_hist.png")

    if any(st["counts"][arm].get("failed", 0) for arm in arms):
        codes = [c for c in st["status_names"] if c != 0]
        known = {arm: sum(st["counts"][arm].get(c, 0) for c in codes) for arm in arms}
        cats = [(st["status_names"][c], {arm: st["counts"][arm].get(c, 0) for arm in arms}) for c in codes]
        other = {arm: st["counts"][arm]["failed"] - known[arm] for arm in arms}
        if any(other.values()):
            cats.append(("other code", other))
        cats = [(name, v) for name, v in cats if any(v.values())]
        fig = Figure(figsize=(max(6, 1.6 * len(cats) + 3), 5), layout="constrained")
        ax = fig.add_subplot()
        x = np.arange(len(cats))
        w = 0.8 / max(len(arms), 1)
        for k, (arm, col) in enumerate(zip(arms, colours)):
            h = [v[arm] for _, v in cats]
            bars = ax.bar(x + (k - (len(arms) - 1) / 2) * w, h, w, color=col,
                          label=f"{arm} ({st['counts'][arm]['failed']} of {st['counts'][arm]['patients']})")
            ax.bar_label(bars, padding=2)
        ax.set_xticks(x, [name for name, _ in cats])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("failed patients")
        ax.set_xlabel("status")
        ax.set_title(f"{job}: failed patients by reason and arm")
        ax.legend(title="arm (failed of patients)", loc="upper center", bbox_to_anchor=(0.5, -0.16),
                  ncol=min(len(arms), 4), frameon=False)
        ax.margins(y=0.12)
        save(fig, "status.png")
    if "[trial]" in str(ds.attrs.get("job_toml", "")) and biomarker_names(ds):
        from .trial_analysis import forest_plot

        written += forest_plot(path, out_dir)
    return written
