"""Poses out: Vina-style PDBQT (MODEL / REMARK VINA RESULT), SDF through meeko, and RMSDs."""

from __future__ import annotations

import numpy as np

from kernels.docking.pdbqt import Ligand


def pose_pdbqt(lig: Ligand, xyz: np.ndarray) -> list[str]:
    """The ligand's PDBQT lines with the atoms moved to `xyz` (input order)."""
    out, k = [], 0
    for line in lig.lines:
        if line.startswith(("ATOM", "HETATM")):
            x, y, z = xyz[k]
            out.append(f"{line[:30]}{x:8.3f}{y:8.3f}{z:8.3f}{line[54:]}")
            k += 1
        elif line.startswith(("MODEL", "ENDMDL")):
            continue
        else:
            out.append(line)
    return out


def vina_out(lig: Ligand, poses: list, rmsds: list[tuple[float, float]]) -> str:
    """Multi-model PDBQT as `vina --out` writes it."""
    text = []
    for i, (p, (lb, ub)) in enumerate(zip(poses, rmsds), start=1):
        s = p.score
        text.append(f"MODEL {i}")
        text.append(f"REMARK VINA RESULT: {s.total:10.3f} {lb:10.3f} {ub:10.3f}")
        if np.isfinite(s.inter):  # exported screen poses keep only the affinity
            text.append(f"REMARK INTER + INTRA:    {s.inter + s.intra:11.3f}")
            text.append(f"REMARK INTER:            {s.inter:11.3f}")
            text.append(f"REMARK INTRA:            {s.intra:11.3f}")
            text.append(f"REMARK UNBOUND:          {s.inter + s.intra - (s.total - s.torsional):11.3f}")
        text += pose_pdbqt(lig, p.xyz)
        text.append("ENDMDL")
    return "\n".join(text) + "\n"


def rmsd_bounds(lig: Ligand, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Vina's 'rmsd l.b.' (each atom to the nearest atom of the same XS type, both ways) and
    'rmsd u.b.' (atom to the same atom) over heavy atoms."""
    h = lig.heavy
    A, B, t = a[h], b[h], lig.xs[h]
    ub = float(np.sqrt(((A - B) ** 2).sum(1).mean()))
    d = ((A[:, None, :] - B[None, :, :]) ** 2).sum(-1)
    d = np.where(t[:, None] == t[None, :], d, np.inf)
    lb = float(max(np.sqrt(d.min(1).mean()), np.sqrt(d.min(0).mean())))
    return lb, ub


def symmetric_rmsd(lig: Ligand, a: np.ndarray, b: np.ndarray) -> float:
    """Heavy-atom RMSD without superposition, minimised over the molecular graph's automorphisms
    (symmetry-aware: equivalent atoms such as carboxylate oxygens or ring flips may swap)."""
    from rdkit import Chem

    h = np.nonzero(lig.heavy)[0]
    pos = {int(i): k for k, i in enumerate(h)}
    m = Chem.RWMol()
    for i in h:
        at = Chem.Atom(_element(lig.ad[i]))
        at.SetNoImplicit(True)
        m.AddAtom(at)
    for i in h:
        for j in lig.bonds[i]:
            if j > i and j in pos:
                m.AddBond(pos[int(i)], pos[int(j)], Chem.BondType.SINGLE)
    mol = m.GetMol()
    mol.UpdatePropertyCache(strict=False)
    A, B = a[h], b[h]
    best = np.inf
    for match in mol.GetSubstructMatches(mol, uniquify=False, useChirality=False, maxMatches=100000):
        d = A - B[list(match)]
        best = min(best, float(np.sqrt((d * d).sum(1).mean())))
    return best


def _element(ad: str) -> str:
    return {"A": "C", "NA": "N", "OA": "O", "SA": "S", "HD": "H", "Se": "Se"}.get(ad, ad)


def pose_sdf(pdbqt_text: str) -> str:
    """SDF of every model in a Vina-style output, through meeko (needs meeko's SMILES remarks)."""
    from meeko import PDBQTMolecule, RDKitMolCreate
    from rdkit import Chem

    pm = PDBQTMolecule(pdbqt_text, skip_typing=True)
    mols = RDKitMolCreate.from_pdbqt_mol(pm)
    if not mols or mols[0] is None:
        raise ValueError("this PDBQT has no meeko SMILES remarks; SDF export needs a ligand prepared with meeko")
    mol = mols[0]
    out = []
    for cid, conf in enumerate(mol.GetConformers()):
        out.append(Chem.MolToMolBlock(mol, confId=conf.GetId()) + "$$$$\n")
    return "".join(out)
