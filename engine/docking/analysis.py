"""Docking screen results: hit ranking (Dask), score-distribution plots, pose export."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import StoreError


def _master(path) -> Path:
    p = Path(path)
    p = p / "RUN.h5" if p.is_dir() else p
    if not p.is_file():
        raise StoreError(f"{p} does not exist: no run result there")
    return p


def is_docking_result(path) -> bool:
    import h5py

    try:
        with h5py.File(_master(path), "r") as f:
            k = f.attrs.get("kind", b"")
            return (k.decode() if isinstance(k, bytes) else str(k)) == "docking"
    except (StoreError, OSError):
        return False


def open_screen(path, chunk: int = 4096):
    """The screen as a Dask-backed xarray Dataset (chunked along `ligand`)."""
    import xarray as xr

    return xr.open_dataset(_master(path), engine="h5netcdf", chunks={"ligand": chunk})


def _s(x) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def hits(path, top: int = 10) -> dict[str, list[dict]]:
    """Per target, the `top` best-scoring ligands (status ok), ranked with Dask."""
    import dask

    ds = open_screen(path)
    out = {}
    try:
        score = ds["score"].where(ds["status"] == 0)
        for k, t in enumerate(ds["target"].values):
            col = score.isel(target=k).data
            neg = dask.array.where(dask.array.isnan(col), -np.inf, -col)  # best = most negative score
            order = dask.array.argtopk(neg, min(top, col.shape[0]))
            idx, vals = dask.compute(order, col)
            idx = [int(i) for i in idx if np.isfinite(vals[i])]
            idx.sort(key=lambda i: vals[i])
            names = ds["name"].values
            smiles = ds["smiles"].values
            out[_s(t)] = [{"rank": r + 1, "ligand": i, "name": _s(names[i]), "score": float(vals[i]),
                           "smiles": _s(smiles[i])} for r, i in enumerate(idx)]
    finally:
        ds.close()
    return out


def summary(path, top: int = 10) -> str:
    import dask

    ds = open_screen(path)
    try:
        st = ds["status"]
        meanings = _s(st.attrs.get("flag_meanings", "")).split()
        values = [int(v) for v in np.atleast_1d(st.attrs.get("flag_values", []))]
        counts = dask.compute(*[(st == v).sum(dim="ligand").data for v in values])
        n_lig = ds.sizes["ligand"]
        targets = [_s(t) for t in ds["target"].values]
        lines = [f"{_master(path)}: docking screen, {n_lig} ligands x {len(targets)} targets "
                 f"({_s(ds.attrs.get('scoring_function', ''))}, backend {_s(ds.attrs.get('backend', ''))})"]
        lpcs = ds.attrs.get("ligands_per_cpu_second")
        if lpcs is not None:
            lines.append(f"throughput: {float(lpcs):.4g} ligands per CPU-second (all targets per ligand)")
        for k, t in enumerate(targets):
            parts = [f"{meanings[j]} {int(c[k])}" for j, c in enumerate(counts) if int(c[k])]
            lines.append(f"target {t}: " + ", ".join(parts))
    finally:
        ds.close()
    for t, rows in hits(path, top).items():
        lines.append(f"\ntop {len(rows)} hits for {t} (Vina affinity, kcal/mol)")
        lines.append(f"{'rank':>4}  {'score':>8}  {'ligand':>6}  name")
        for r in rows:
            lines.append(f"{r['rank']:>4}  {r['score']:>8.3f}  {r['ligand']:>6}  {r['name']}")
    return "\n".join(lines)


def report(path, out_dir) -> list[Path]:
    """One PNG per target: distribution of best scores; plus a failure-reason bar chart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = open_screen(path)
    paths = []
    try:
        status = ds["status"].values
        score = ds["score"].values
        targets = [_s(t) for t in ds["target"].values]
        for k, t in enumerate(targets):
            ok = (status[:, k] == 0) & np.isfinite(score[:, k])
            fig = Figure(figsize=(6, 4))
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            if ok.any():
                ax.hist(score[ok, k], bins=max(5, min(50, int(ok.sum() // 2) or 5)), color="tab:blue")
            ax.set_xlabel("Vina affinity of best pose (kcal/mol)")
            ax.set_ylabel("ligands")
            ax.set_title(f"{t}: {int(ok.sum())} docked, {int((~ok).sum())} failed")
            p = out / f"score_distribution_{t}.png"
            fig.savefig(p, dpi=100)
            paths.append(p)
        meanings = _s(ds["status"].attrs.get("flag_meanings", "")).split()
        values = [int(v) for v in np.atleast_1d(ds["status"].attrs.get("flag_values", []))]
        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        c = [int((status == v).any(axis=1).sum()) for v in values]
        ax.barh(meanings, c, color="tab:gray")
        ax.set_xlabel("ligands (any target)")
        ax.set_title("status")
        fig.tight_layout()
        p = out / "status.png"
        fig.savefig(p, dpi=100)
        paths.append(p)
    finally:
        ds.close()
    return paths


def export_poses(path, out_dir, top: int = 10, fmt: str = "pdbqt") -> list[Path]:
    """Write the stored poses of the `top` hits per target as Vina-style PDBQT (or SDF)."""
    from kernels.docking.pdbqt import read_ligand
    from kernels.docking.search import Pose
    from kernels.docking.vina_sf import Score

    from .poses import pose_sdf, rmsd_bounds, vina_out

    if fmt not in ("pdbqt", "sdf"):
        raise StoreError(f"--format {fmt!r}: pdbqt or sdf")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import h5py

    written = []
    ranked = hits(path, top)
    with h5py.File(_master(path), "r") as f:
        targets = [_s(t) for t in f["target"][()]]
        for t, rows in ranked.items():
            k = targets.index(t)
            for r in rows:
                i = r["ligand"]
                lig = read_ligand(_s(f["ligand_pdbqt"][i]), r["name"])
                n = len(lig.xs)
                ms = f["mode_score"][i, k]
                xyz = f["pose"][i, k][:, :n].astype(float)
                poses = [Pose(xyz[j], Score(float(ms[j]), np.nan, np.nan, np.nan, np.zeros(5)))
                         for j in range(len(ms)) if np.isfinite(ms[j])]
                rm = [rmsd_bounds(lig, p.xyz, poses[0].xyz) for p in poses]
                text = vina_out(lig, poses, rm)
                safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in r["name"])[:60]
                p = out / f"{t}_{r['rank']:03d}_{safe}.{fmt}"
                p.write_text(pose_sdf(text) if fmt == "sdf" else text)
                written.append(p)
    return written
