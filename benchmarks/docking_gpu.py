"""Docking throughput: the batched search (cpu or cuda backend) vs the per-ligand path vs AutoDock Vina.

A small drug library (tests/data/docking/library_sample.csv, prepared with RDKit + meeko) is docked
into c-Abl kinase (1iep, Vina's own 20 Å box) at one exhaustiveness and Vina's full step count.

cpu (default; runs anywhere): one thread each, CPU seconds = process time of this process
  - batched:    all ligands' chains in one vina_dock_batch call (search.dock_batch)
  - per_ligand: search.dock once per ligand (the per-ligand path; same chain code, batch of one)
  - vina:       AutoDock Vina 1.2 (PyPI `vina`), one ligand after another, cpu=1
cuda (GPU machine): needs CuPy and a device, else exits 2 saying why
  - parity: the same ligands on cuda and cpu (lower effort): best score per ligand, and biotin
    redocked into 1stp on the GPU (RMSD to the crystal pose)
  - throughput: the library replicated to --gpu-ligands ligands (distinct seeds) in one batch:
    ligands/s of the search kernel alone, and of the whole dock_batch (with the CPU refinement and
    NumPy rescoring) on --e2e-ligands of them, against single-core Vina's ligands/s measured on
    the library in the same run

    python benchmarks/docking_gpu.py [--backend cpu|cuda] [--exhaustiveness 8] [--out results.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.docking.poses import symmetric_rmsd  # noqa: E402
from engine.docking.prepare import prepare_smiles  # noqa: E402
from kernels.docking import search  # noqa: E402
from kernels.docking import vina_sf as sf  # noqa: E402
from kernels.docking.pdbqt import read_ligand, read_receptor  # noqa: E402

D = ROOT / "tests" / "data" / "docking"
REC = D / "1iep_receptor.pdbqt"
BOX = sf.Box((15.190, 53.903, 16.917), (20.0, 20.0, 20.0))


def library(n: int | None) -> list[tuple[str, str]]:
    """(name, PDBQT) of the sample library's ligands (first n)."""
    with open(D / "library_sample.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    return [(r["name"], prepare_smiles(r["smiles"], r["name"], seed=i).pdbqt) for i, r in enumerate(rows)]


def _timed(f):
    c0, w0 = time.process_time(), time.time()
    out = f()
    return out, time.process_time() - c0, time.time() - w0


def run_twin(mode: str, R, ligs, maps, exh: int, seed: int, backend: str = "cpu", steps_scale: float = 1.0):
    seeds = [seed + i for i in range(len(ligs))]
    if mode == "per_ligand":
        def go():
            return [search.dock(R, lg, BOX, exhaustiveness=exh, seed=s, n_poses=9, maps=maps, threads=1,
                                steps_scale=steps_scale, backend=backend) for lg, s in zip(ligs, seeds)]
    else:
        def go():
            return search.dock_batch(R, ligs, BOX, exh, seeds, n_poses=9, maps=maps, threads=1,
                                     steps_scale=steps_scale, backend=backend)
    res, cpu, wall = _timed(go)
    return [r[0][0].score.total for r in res], cpu, wall


def run_vina(pdbqts: list[str], exh: int, seed: int):
    from vina import Vina

    def go():
        scores = []
        for i, text in enumerate(pdbqts):
            v = Vina(sf_name="vina", cpu=1, seed=seed + i, verbosity=0)
            v.set_receptor(str(REC))
            v.set_ligand_from_string(text)
            v.compute_vina_maps(center=list(BOX.center), box_size=list(BOX.size))
            v.dock(exhaustiveness=exh, n_poses=9)
            scores.append(float(v.energies(n_poses=1)[0][0]))
        return scores

    return _timed(go)


def cpu_benchmark(a, R, lib, out: dict) -> None:
    ligs = [read_ligand(t, n) for n, t in lib]
    maps = search.compute_maps(R, np.concatenate([lg.xs[lg.heavy] for lg in ligs]), BOX, 1)
    search.dock_batch(R, ligs[:1], BOX, 1, [0], maps=maps, threads=1, steps_scale=1e-4)  # load the library first
    for mode in a.modes:
        if mode == "vina":
            scores, cpu, wall = run_vina([t for _, t in lib], a.exhaustiveness, a.seed)
        else:
            scores, cpu, wall = run_twin(mode, R, ligs, maps, a.exhaustiveness, a.seed)
        out["cpu"][mode] = {"scores": scores, "cpu_s": cpu, "wall_s": wall, "ligands_per_cpu_s": len(lib) / cpu}
        print(f"{mode:>10s}: {len(lib)} ligands, {cpu:.1f} CPU s ({len(lib) / cpu:.4f} ligands per CPU-second), "
              f"best scores {np.round(scores, 2).tolist()}", flush=True)


def cuda_benchmark(a, R, lib, out: dict) -> None:  # pragma: no cover - needs a GPU
    from engine.backend import resolve

    dev = resolve("cuda")
    out["device"] = dev.device
    ligs = [read_ligand(t, n) for n, t in lib]
    maps = search.compute_maps(R, np.concatenate([lg.xs[lg.heavy] for lg in ligs]), BOX)
    # parity at lower effort: best score per ligand on both backends (chains diverge by rounding)
    g, _, gw = run_twin("batched", R, ligs, maps, a.exhaustiveness, a.seed, "cuda", a.parity_steps_scale)
    c, _, cw = run_twin("batched", R, ligs, maps, a.exhaustiveness, a.seed, "cpu", a.parity_steps_scale)
    diff = np.abs(np.array(g) - np.array(c))
    b = read_ligand((D / "1stp_ligand.pdbqt").read_text())
    rb = read_receptor((D / "1stp_protein.pdbqt").read_text())
    h = b.xyz[b.heavy]
    bbox = sf.Box(tuple((h.min(0) + h.max(0)) / 2), tuple(h.max(0) - h.min(0) + 12.0))
    poses, _ = search.dock(sf.ReceptorIndex(rb.xyz, rb.xs), b, bbox, exhaustiveness=a.exhaustiveness, seed=a.seed,
                           backend="cuda")
    rmsd = symmetric_rmsd(b, poses[0].xyz, b.xyz)
    out["parity"] = {"steps_scale": a.parity_steps_scale, "cuda": g, "cpu": c, "max_abs_diff": float(diff.max()),
                     "median_abs_diff": float(np.median(diff)), "redock_1stp_rmsd": rmsd,
                     "redock_1stp_score": poses[0].score.total}
    print(f"parity (steps x{a.parity_steps_scale}): best-score |cuda - cpu| median {np.median(diff):.3f}, max "
          f"{diff.max():.3f} kcal/mol; 1stp redock on cuda: {rmsd:.2f} A, {poses[0].score.total:.3f}", flush=True)
    # throughput: one batch of many ligands
    from kernels.docking import batch

    n = a.gpu_ligands
    big = [ligs[i % len(ligs)] for i in range(n)]
    models = [search.LigandModel(lg, maps) for lg in big]
    steps = [(search.vina_steps(lg)[0], search.vina_steps(lg)[1]) for lg in big]
    batch.search_chains(models[:len(ligs)], list(range(len(ligs))), steps[:len(ligs)], 1, 1.0, "cuda")  # compile
    _, _, kw = _timed(lambda: batch.search_chains(models, list(range(n)), steps, a.exhaustiveness, 1.0, "cuda"))
    ne = min(n, a.e2e_ligands)  # the CPU refinement + NumPy rescoring per ligand is the slow part here
    _, _, ew = _timed(lambda: search.dock_batch(R, big[:ne], BOX, a.exhaustiveness, list(range(ne)), n_poses=9,
                                                maps=maps, backend="cuda"))
    vs, vcpu, _ = run_vina([t for _, t in lib], a.exhaustiveness, a.seed)
    vina_rate = len(lib) / vcpu
    out["throughput"] = {"ligands": n, "kernel_wall_s": kw, "kernel_ligands_per_s": n / kw,
                         "end_to_end_ligands": ne, "end_to_end_wall_s": ew, "end_to_end_ligands_per_s": ne / ew,
                         "vina_1core_ligands_per_s": vina_rate, "speedup_kernel_vs_vina_1core": n / kw / vina_rate,
                         "speedup_end_to_end_vs_vina_1core": ne / ew / vina_rate, "vina_scores": vs}
    print(f"cuda: {n} ligands x {a.exhaustiveness} chains: kernel {n / kw:.1f} ligands/s; end to end ({ne} ligands) "
          f"{ne / ew:.1f} ligands/s; Vina 1 core {vina_rate:.4f} ligands/s -> {n / kw / vina_rate:.0f}x (kernel), "
          f"{ne / ew / vina_rate:.0f}x (end to end)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--exhaustiveness", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ligands", type=int, default=None, help="first N library ligands (default: all 8)")
    ap.add_argument("--modes", nargs="*", default=["batched", "per_ligand", "vina"])
    ap.add_argument("--parity-steps-scale", type=float, default=0.25)
    ap.add_argument("--gpu-ligands", type=int, default=4096, help="ligands in the timed GPU batch")
    ap.add_argument("--e2e-ligands", type=int, default=256, help="ligands timed end to end (search + refinement)")
    ap.add_argument("--out", "-o", type=Path)
    a = ap.parse_args()
    if a.backend == "cuda":
        from engine.backend import available

        ok, why = available("cuda")
        if not ok:
            print(f"docking_gpu: the cuda backend cannot run here: {why}", file=sys.stderr)
            return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rec = read_receptor(REC.read_text())
    R = sf.ReceptorIndex(rec.xyz, rec.xs)
    lib = library(a.ligands)
    out = {"exhaustiveness": a.exhaustiveness, "seed": a.seed, "ligands": [n for n, _ in lib], "cpu": {}}
    if a.backend == "cpu":
        cpu_benchmark(a, R, lib, out)
    else:
        cuda_benchmark(a, R, lib, out)
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
