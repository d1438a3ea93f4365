"""Ligand preparation with RDKit + meeko, with one clear failure reason per bad molecule.

A library screen must survive bad entries (the complaint users of Vina, Vina-GPU and Uni-Dock
raise most), so every check here raises `LigandFailure(code, reason)` and the screen records it.
Protonation is taken as given (no pKa model): the SMILES/SDF states are docked as written.
"""

from __future__ import annotations

from dataclasses import dataclass

# elements with XS types in Vina's scoring function (metals are receptor-side only)
SUPPORTED = {"H", "C", "N", "O", "F", "P", "S", "Cl", "Br", "I"}
MAX_TORSIONS = 32  # beyond this a Monte Carlo search cannot converge at usual exhaustiveness
FAILURE_CODES = {
    "invalid_structure": 1,  # unparsable SMILES/SDF or RDKit sanitisation failed (valence, charges)
    "unsupported_element": 2,
    "no_heavy_atoms": 3,
    "disconnected": 4,  # salts / mixtures
    "too_flexible": 5,
    "embedding_failed": 6,
    "preparation_failed": 7,  # meeko could not type or write the molecule
    "implausible_charge": 8,
    "docking_failed": 9,
}


class LigandFailure(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class PreparedLigand:
    name: str
    pdbqt: str
    smiles: str
    n_heavy: int
    n_torsions: int


def _rdkit_quiet():
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")


def mol_from_smiles(smiles: str):
    from rdkit import Chem

    _rdkit_quiet()
    if not isinstance(smiles, str) or not smiles.strip():
        raise LigandFailure("invalid_structure", "empty SMILES")
    mol = Chem.MolFromSmiles(smiles.strip(), sanitize=False)
    if mol is None:
        raise LigandFailure("invalid_structure", f"invalid SMILES {smiles.strip()[:60]!r}")
    try:
        Chem.SanitizeMol(mol)
    except Exception as e:  # noqa: BLE001 - RDKit raises several sanitisation exception types
        raise LigandFailure("invalid_structure", f"RDKit sanitisation failed: {str(e).splitlines()[0][:120]}") from None
    return mol


def check(mol, largest_fragment: bool = False):
    """Element, size, charge and connectivity checks; returns the molecule to prepare."""
    from rdkit import Chem
    from rdkit.Chem.rdmolops import GetMolFrags

    frags = GetMolFrags(mol, asMols=True)
    if len(frags) > 1:
        if not largest_fragment:
            raise LigandFailure("disconnected", f"{len(frags)} disconnected fragments (salt or mixture); "
                                                "set largest_fragment = true to dock the largest")
        mol = max(frags, key=lambda m: m.GetNumHeavyAtoms())
    bad = sorted({a.GetSymbol() for a in mol.GetAtoms()} - SUPPORTED)
    if bad:
        raise LigandFailure("unsupported_element", f"unsupported element(s) {', '.join(bad)} (no Vina XS type)")
    if mol.GetNumHeavyAtoms() == 0:
        raise LigandFailure("no_heavy_atoms", "no heavy atoms")
    for a in mol.GetAtoms():
        if abs(a.GetFormalCharge()) > 1:
            raise LigandFailure("implausible_charge", f"formal charge {a.GetFormalCharge():+d} on {a.GetSymbol()} "
                                                      f"(atom {a.GetIdx()})")
    return Chem.Mol(mol)


def _to_pdbqt(mol, name: str, max_torsions: int) -> tuple[str, int]:
    from meeko import MoleculePreparation, PDBQTWriterLegacy

    try:
        setups = MoleculePreparation().prepare(mol)
        text, ok, err = PDBQTWriterLegacy.write_string(setups[0])
    except Exception as e:  # noqa: BLE001 - meeko raises many types for untypable molecules
        raise LigandFailure("preparation_failed", f"meeko: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None
    if not ok:
        raise LigandFailure("preparation_failed", f"meeko: {err.strip()[:120]}")
    n_tors = sum(1 for line in text.splitlines() if line.startswith("BRANCH"))
    if n_tors > max_torsions:
        raise LigandFailure("too_flexible", f"{n_tors} active torsions > {max_torsions}")
    return text, n_tors


def prepare_smiles(smiles: str, name: str, seed: int = 0, largest_fragment: bool = False,
                   max_torsions: int = MAX_TORSIONS) -> PreparedLigand:
    """SMILES → hydrogens → ETKDG 3-D embedding (seeded) → MMFF clean-up → meeko PDBQT."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = check(mol_from_smiles(smiles), largest_fragment)
    # cheap early rejection: rotatable bonds before the costly embedding
    from rdkit.Chem.rdMolDescriptors import CalcNumRotatableBonds

    if CalcNumRotatableBonds(mol) > max_torsions + 8:
        raise LigandFailure("too_flexible", f"{CalcNumRotatableBonds(mol)} rotatable bonds > {max_torsions}")
    molh = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed) % (2**31)
    if AllChem.EmbedMolecule(molh, params) != 0:
        params.useRandomCoords = True
        if AllChem.EmbedMolecule(molh, params) != 0:
            raise LigandFailure("embedding_failed", "RDKit ETKDG could not embed the molecule in 3-D")
    try:
        AllChem.MMFFOptimizeMolecule(molh, maxIters=500)
    except Exception:  # noqa: BLE001 - no MMFF parameters: keep the ETKDG geometry
        pass
    text, n_tors = _to_pdbqt(molh, name, max_torsions)
    return PreparedLigand(name, text, Chem.MolToSmiles(mol), mol.GetNumHeavyAtoms(), n_tors)


def prepare_mol3d(mol, name: str, max_torsions: int = MAX_TORSIONS, largest_fragment: bool = False) -> PreparedLigand:
    """A molecule with 3-D coordinates (SDF): hydrogens added at their positions, then meeko."""
    from rdkit import Chem

    if mol is None:
        raise LigandFailure("invalid_structure", "unreadable SDF record")
    try:
        Chem.SanitizeMol(mol)
    except Exception as e:  # noqa: BLE001
        raise LigandFailure("invalid_structure", f"RDKit sanitisation failed: {str(e).splitlines()[0][:120]}") from None
    mol = check(mol, largest_fragment)
    if mol.GetNumConformers() == 0 or not mol.GetConformer().Is3D():
        return prepare_smiles(Chem.MolToSmiles(mol), name, max_torsions=max_torsions)
    molh = Chem.AddHs(mol, addCoords=True)
    text, n_tors = _to_pdbqt(molh, name, max_torsions)
    return PreparedLigand(name, text, Chem.MolToSmiles(mol), mol.GetNumHeavyAtoms(), n_tors)


def read_sdf(path) -> list:
    """(name, RDKit mol or None) for every record of an SDF file."""
    from rdkit import Chem

    _rdkit_quiet()
    out = []
    for i, m in enumerate(Chem.SDMolSupplier(str(path), sanitize=False, removeHs=False)):
        name = m.GetProp("_Name").strip() if m is not None and m.HasProp("_Name") else ""
        out.append((name or f"mol{i}", m))
    return out
