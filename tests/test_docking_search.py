"""Docking search: redocking a crystal ligand from random starts, and the `twin dock` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.docking.poses import symmetric_rmsd
from kernels.docking import search
from kernels.docking import vina_sf as sf
from kernels.docking.pdbqt import read_ligand, read_receptor

D = Path(__file__).parent / "data" / "docking"
TWIN = [sys.executable, "-m", "engine.cli"]


def test_redock_biotin_within_2A():
    """1stp (streptavidin/biotin, 5 torsions): every chain starts at a random position, orientation
    and torsions in a box of ligand extent + 12 Å; the top pose must lie within 2 Å heavy-atom RMSD
    (symmetry-aware, no superposition) of the crystal pose - the usual redocking success criterion.
    Low effort for CI: 4 chains at 30 % of Vina's step count (the benchmark runs full effort)."""
    rec = read_receptor((D / "1stp_protein.pdbqt").read_text())
    lig = read_ligand((D / "1stp_ligand.pdbqt").read_text())
    h = lig.xyz[lig.heavy]
    box = sf.Box(tuple((h.min(0) + h.max(0)) / 2), tuple(h.max(0) - h.min(0) + 12.0))
    R = sf.ReceptorIndex(rec.xyz, rec.xs)
    poses, st = search.dock(R, lig, box, exhaustiveness=4, seed=1, steps_scale=0.3)
    assert st["chains"] == 4
    rmsd = symmetric_rmsd(lig, poses[0].xyz, lig.xyz)
    assert rmsd < 2.0, (rmsd, poses[0].score.total)
    # the docked optimum scores at least as well as the crystal pose (Vina: -6.725)
    assert poses[0].score.total < -6.5
    assert all(a.score.total <= b.score.total for a, b in zip(poses, poses[1:]))


def test_symmetric_rmsd_sees_carboxylate_swap():
    """Swapping biotin's two carboxylate oxygens is 0 Å symmetry-aware but not in plain RMSD."""
    lig = read_ligand((D / "1stp_ligand.pdbqt").read_text())
    o = [i for i, n in enumerate(lig.names) if n in ("O11", "O12")]
    x = lig.xyz.copy()
    x[o] = x[o[::-1]]
    assert symmetric_rmsd(lig, x, lig.xyz) == pytest.approx(0.0, abs=1e-12)
    assert search.heavy_rmsd(x, lig.xyz, lig.heavy) > 0.3


def test_twin_dock_score_only_prints_vina_numbers():
    r = subprocess.run(TWIN + ["dock", "--receptor", str(D / "1iep_receptor.pdbqt"), "--ligand",
                               str(D / "1iep_ligand.pdbqt"), "--center_x", "15.190", "--center_y", "53.903",
                               "--center_z", "16.917", "--size_x", "20", "--size_y", "20", "--size_z", "20",
                               "--score_only"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Estimated Free Energy of Binding   : -12.513 (kcal/mol)" in r.stdout
    assert "(1) Final Intermolecular Energy    : -17.634" in r.stdout


def test_twin_dock_bad_box_is_one_line_error(tmp_path):
    r = subprocess.run(TWIN + ["dock", "--receptor", str(D / "1stp_protein.pdbqt"), "--ligand",
                               str(D / "1stp_ligand.pdbqt"), "--center_x", "0", "--center_y", "0", "--center_z", "0",
                               "--size_x", "-5", "--size_y", "10", "--size_z", "10"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "twin: error: --size_x = -5.0: must be > 0"
    r = subprocess.run(TWIN + ["dock", "--receptor", str(D / "1stp_protein.pdbqt"), "--ligand", "OB(O)c1ccccc1",
                               "--autobox_ligand", str(D / "1stp_ligand.pdbqt")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "unsupported element(s) B" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_twin_dock_writes_vina_style_pdbqt_and_sdf(tmp_path):
    out = tmp_path / "out.pdbqt"
    args = ["dock", "--receptor", str(D / "1iep_receptor.pdbqt"), "--ligand", str(D / "1iep_ligand.pdbqt"),
            "--center_x", "15.190", "--center_y", "53.903", "--center_z", "16.917", "--size_x", "20", "--size_y", "20",
            "--size_z", "20", "--local_only", "--out", str(out)]
    r = subprocess.run(TWIN + args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.startswith("MODEL 1\nREMARK VINA RESULT:")
    # local optimisation of the crystal pose: Vina's optimize() gives -13.170
    assert float(text.splitlines()[1].split()[3]) == pytest.approx(-13.170, abs=0.02)
    from engine.docking.poses import pose_sdf

    sdf = pose_sdf(text)
    assert sdf.count("$$$$") == 1 and " N " in sdf
