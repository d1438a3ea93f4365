"""Redocking benchmark: twin's Vina-compatible docking side by side with AutoDock Vina.

For each complex the crystal ligand is docked back into its receptor by both programs at the same
exhaustiveness (both start every Monte Carlo chain from a random position, orientation and
torsions), one CPU thread each. Reported: best score, symmetry-aware heavy-atom RMSD of the top
pose to the crystal pose (no superposition; success < 2 Å), and CPU seconds (process time).

    python benchmarks/docking_redock.py --data DIR [--exhaustiveness 8] [--seed 1] [--out results.json]

DIR holds the docking reference folders (1iep/, 1stp/, 3ce3/, 7cpa/, 1a30/, 1bcu/ as described in
tests/data/docking/SOURCES.md). 1bcu's receptor is prepared from its PDB with meeko's
mk_prepare_receptor.py; ligands given only as SDF are prepared with RDKit + meeko.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.docking.poses import symmetric_rmsd  # noqa: E402
from engine.docking.prepare import prepare_mol3d, read_sdf  # noqa: E402
from kernels.docking import search  # noqa: E402
from kernels.docking import vina_sf as sf  # noqa: E402
from kernels.docking.pdbqt import read_ligand, read_receptor  # noqa: E402


def _extent_box(lig_text: str, pad: float = 12.0):
    lig = read_ligand(lig_text)
    h = lig.xyz[lig.heavy]
    return (h.min(0) + h.max(0)) / 2, h.max(0) - h.min(0) + pad


def complexes(data: Path, work: Path) -> list[dict]:
    out = []

    def sdf_ligand(p):
        name, mol = read_sdf(p)[0]
        return prepare_mol3d(mol, name).pdbqt

    out.append(dict(name="1iep", rec=data / "1iep/1iep_receptor.pdbqt", lig=(data / "1iep/1iep_ligand.pdbqt").read_text(),
                    center=(15.190, 53.903, 16.917), size=(20.0, 20.0, 20.0)))
    for n, rec in (("1stp", "1stp/1stp_protein.pdbqt"), ("3ce3", "3ce3/3ce3_protein.pdbqt"), ("7cpa", "7cpa/rec.pdbqt")):
        lig = (data / f"{n}/{n}_ligand.pdbqt").read_text()
        c, s = _extent_box(lig)
        out.append(dict(name=n, rec=data / rec, lig=lig, center=tuple(c), size=tuple(s)))
    out.append(dict(name="1a30", rec=data / "1a30/1a30_protein.pdbqt", lig=sdf_ligand(data / "1a30/1a30_ligand.sdf"),
                    center=(8.729, 25.62, 4.682), size=(19.12, 16.56, 18.65)))
    exe = shutil.which("mk_prepare_receptor.py", path=str(Path(sys.executable).parent)) or "mk_prepare_receptor.py"
    subprocess.run([exe, "--read_pdb", str(data / "1bcu/1bcu_protein.pdb"), "-o", str(work / "1bcu_rec"), "-p"],
                   check=True, capture_output=True)
    g = json.loads((data / "1bcu/1bcu_docking_grid.json").read_text())
    # 1bcu's SDF is an input conformer near the origin, not the crystal pose: docked, no RMSD success
    out.append(dict(name="1bcu", crystal=False, rec=work / "1bcu_rec.pdbqt", lig=sdf_ligand(data / "1bcu/1bcu_ligand.sdf"),
                    center=(g["center_x"], g["center_y"], g["center_z"]), size=(g["size_x"], g["size_y"], g["size_z"])))
    return out


def run_twin(c: dict, exh: int, seed: int) -> dict:
    rec = read_receptor(Path(c["rec"]).read_text())
    lig = read_ligand(c["lig"])
    box = sf.Box(tuple(map(float, c["center"])), tuple(map(float, c["size"])))
    t0, w0 = time.process_time(), time.time()
    R = sf.ReceptorIndex(rec.xyz, rec.xs)
    poses, _ = search.dock(R, lig, box, exhaustiveness=exh, seed=seed, n_poses=9, threads=1)
    cpu, wall = time.process_time() - t0, time.time() - w0
    return {"score": poses[0].score.total, "rmsd": symmetric_rmsd(lig, poses[0].xyz, lig.xyz), "cpu_s": cpu,
            "wall_s": wall}


def run_vina(c: dict, exh: int, seed: int, work: Path) -> dict:
    from vina import Vina

    lig = read_ligand(c["lig"])
    t0, w0 = time.process_time(), time.time()
    v = Vina(sf_name="vina", cpu=1, seed=seed, verbosity=0)
    v.set_receptor(str(c["rec"]))
    v.set_ligand_from_string(c["lig"])
    v.compute_vina_maps(center=list(c["center"]), box_size=list(c["size"]))
    v.dock(exhaustiveness=exh, n_poses=9)
    cpu, wall = time.process_time() - t0, time.time() - w0
    e = v.energies(n_poses=1)[0][0]
    top = read_ligand(v.poses(n_poses=1))
    return {"score": float(e), "rmsd": symmetric_rmsd(lig, top.xyz, lig.xyz), "cpu_s": cpu, "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--exhaustiveness", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="complex names")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for c in complexes(a.data, Path(d)):
            if a.only and c["name"] not in a.only:
                continue
            t = run_twin(c, a.exhaustiveness, a.seed)
            v = run_vina(c, a.exhaustiveness, a.seed, Path(d))
            rows.append({"complex": c["name"], "crystal_pose": c.get("crystal", True), "twin": t, "vina": v})
            print(f"{c['name']}: twin {t['score']:.3f} kcal/mol, RMSD {t['rmsd']:.2f} Å, {t['cpu_s']:.1f} CPU s | "
                  f"vina {v['score']:.3f}, RMSD {v['rmsd']:.2f} Å, {v['cpu_s']:.1f} CPU s", flush=True)
    ok_t = sum(r["twin"]["rmsd"] < 2 for r in rows if r["crystal_pose"])
    ok_v = sum(r["vina"]["rmsd"] < 2 for r in rows if r["crystal_pose"])
    ct = sum(r["twin"]["cpu_s"] for r in rows)
    cv = sum(r["vina"]["cpu_s"] for r in rows)
    summary = {"exhaustiveness": a.exhaustiveness, "seed": a.seed, "success_twin": ok_t, "success_vina": ok_v,
               "n": len(rows), "n_with_crystal_pose": sum(r["crystal_pose"] for r in rows), "cpu_s_twin": ct, "cpu_s_vina": cv,
               "ligands_per_cpu_s_twin": len(rows) / ct, "ligands_per_cpu_s_vina": len(rows) / cv}
    print(json.dumps(summary, indent=1))
    if a.out:
        a.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
