"""PDBQT reading: receptors (rigid atoms) and ligands (atoms + torsion tree), with the bond
graph, XS types, intramolecular pairs and torsion count exactly as AutoDock Vina 1.2 derives them.

Vina's rules reproduced here (src/lib/parse_pdbqt.cpp, model.cpp):
* rigid pieces: ROOT is piece 0; `BRANCH x y` opens a piece whose atoms follow, except that the
  axis atom y belongs to the parent piece (it lies on the rotation axis);
* two atoms are fixed relative to each other when in the same piece, or when one of them is an
  axis atom (x or y) of the other's piece; the pair (x, y) is the rotatable bond;
* a bond joins two non-variable atoms closer than 1.1 × the sum of their covalent radii unless a
  third atom, fixed relative to both, is closer to each of them than they are to each other;
* intramolecular pairs: heavy atoms in different pieces that are not fixed relative to each other
  and more than three bonds apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from .atom_types import AD_TYPES, BOND_ALLOWANCE, EL_H, MAX_COVALENT_RADIUS, NO_XS, xs_types


class PdbqtError(ValueError):
    pass


def _atom_line(line: str, where: str) -> tuple[int, str, np.ndarray, float, str]:
    try:
        serial = int(line[6:11])
        name = line[12:16].strip()
        xyz = np.array([float(line[30:38]), float(line[38:46]), float(line[46:54])])
        charge = float(line[70:76]) if line[70:76].strip() else 0.0
        ad = line[77:].split()[0] if len(line) > 77 and line[77:].split() else line.split()[-1]
    except (ValueError, IndexError) as e:
        raise PdbqtError(f"{where}: unreadable ATOM line {line.rstrip()!r} ({e})") from None
    if ad == "CL":
        ad = "Cl"
    if ad not in AD_TYPES:
        raise PdbqtError(f"{where}: atom {serial} {name!r} has AutoDock type {ad!r}, which Vina's XS scoring does not support")
    return serial, name, xyz, charge, ad


def _bonds(xyz: np.ndarray, ad: list[str], fixed) -> list[list[int]]:
    """Covalent bonds by Vina's distance rule; `fixed(i, j)` says two atoms cannot move apart."""
    n = len(ad)
    cov = np.array([AD_TYPES[t][1] for t in ad])
    tree = cKDTree(xyz)
    near = tree.query_ball_point(xyz, BOND_ALLOWANCE * (cov + MAX_COVALENT_RADIUS))
    bonds: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        rel = [j for j in near[i] if j != i and fixed(i, j)]
        for j in rel:
            if j <= i:
                continue
            r2 = float(((xyz[i] - xyz[j]) ** 2).sum())
            if r2 >= (BOND_ALLOWANCE * (cov[i] + cov[j])) ** 2:
                continue
            between = False
            for c in rel:  # an atom closer to both, fixed relative to both, means i-j is not a bond
                if c == j or not fixed(j, c):
                    continue
                if ((xyz[i] - xyz[c]) ** 2).sum() < r2 and ((xyz[j] - xyz[c]) ** 2).sum() < r2:
                    between = True
                    break
            if not between:
                bonds[i].append(j)
                bonds[j].append(i)
    return [sorted(b) for b in bonds]


def _bonded_within(bonds: list[list[int]], a: int, n: int) -> set[int]:
    """Vina's model::bonded_to: a depth-first walk that does not revisit atoms, so in fused rings
    an atom first reached by a long path is not expanded again (reproduced on purpose)."""
    out: list[int] = []

    def walk(x: int, k: int) -> None:
        if x in out:
            return
        out.append(x)
        if k > 0:
            for y in bonds[x]:
                walk(y, k - 1)

    walk(a, n)
    return set(out)


@dataclass
class Receptor:
    xyz: np.ndarray  # (n, 3) heavy atoms only
    xs: np.ndarray  # (n,) XS type
    n_all: int  # atoms in the file, hydrogens included


def read_receptor(text: str, where: str = "receptor") -> Receptor:
    xyz, ad = [], []
    for line in text.splitlines():
        if line.startswith(("ATOM", "HETATM")):
            _, _, p, _, t = _atom_line(line, where)
            xyz.append(p)
            ad.append(t)
    if not xyz:
        raise PdbqtError(f"{where}: no ATOM/HETATM records")
    X = np.array(xyz)
    bonds = _bonds(X, ad, lambda i, j: True)  # a rigid receptor: every pair is fixed
    xs = xs_types(ad, bonds)
    heavy = xs != NO_XS
    return Receptor(X[heavy], xs[heavy], len(ad))


@dataclass
class Ligand:
    """A flexible ligand: atoms (hydrogens kept for output; only heavy atoms are scored) and its
    torsion tree. Bodies are in tree order (parent before child); body 0 is the root."""

    xyz: np.ndarray  # (n, 3) input coordinates
    ad: list[str]
    names: list[str]
    serials: list[int]
    charges: np.ndarray
    xs: np.ndarray  # XS type, NO_XS for hydrogens
    body: np.ndarray  # kinematic body of each atom (axis atom y sits in its own child body)
    parent: np.ndarray  # parent body of each body (-1 for the root)
    axis: np.ndarray  # (n_bodies, 2) atom indices (x in parent, y in body) of each body's rotatable bond
    bonds: list[list[int]]
    pairs: np.ndarray  # (m, 2) intramolecular heavy-atom pairs
    num_tors: float  # Vina's torsion count for the (1 + w N) normalisation
    torsdof: int
    lines: list[str] = field(default_factory=list)  # the PDBQT text, to write poses back

    @property
    def n_torsions(self) -> int:
        return len(self.parent) - 1

    @property
    def heavy(self) -> np.ndarray:
        return self.xs != NO_XS


def read_ligand(text: str, where: str = "ligand") -> Ligand:
    xyz, ad, names, serials, charges, kbody = [], [], [], [], [], []
    parent, axis_serial = [-1], [(-1, -1)]
    stack: list[int] = []
    torsdof = None
    pending_y: list[int] = []  # body whose first atom must be its axis atom y
    lines = text.splitlines()
    for line in lines:
        rec = line.split()[0] if line.split() else ""
        if rec == "ROOT":
            stack = [0]
        elif rec == "ENDROOT":
            pass
        elif rec == "BRANCH":
            try:
                x, y = int(line.split()[1]), int(line.split()[2])
            except (IndexError, ValueError):
                raise PdbqtError(f"{where}: bad BRANCH line {line!r}") from None
            if not stack:
                raise PdbqtError(f"{where}: BRANCH outside ROOT")
            parent.append(stack[-1])
            axis_serial.append((x, y))
            stack.append(len(parent) - 1)
        elif rec == "ENDBRANCH":
            if len(stack) < 2:
                raise PdbqtError(f"{where}: unbalanced ENDBRANCH")
            stack.pop()
        elif rec == "TORSDOF":
            torsdof = int(line.split()[1])
        elif rec in ("ATOM", "HETATM"):
            if not stack:
                raise PdbqtError(f"{where}: atom outside ROOT/BRANCH")
            s, nm, p, q, t = _atom_line(line, where)
            serials.append(s)
            names.append(nm)
            xyz.append(p)
            charges.append(q)
            ad.append(t)
            kbody.append(stack[-1])
        elif rec == "MODEL" and xyz:
            break
        elif rec == "ENDMDL":
            break
    if not xyz:
        raise PdbqtError(f"{where}: no atoms")
    idx = {s: i for i, s in enumerate(serials)}
    nb = len(parent)
    axis = np.full((nb, 2), -1, dtype=np.int64)
    for b in range(1, nb):
        x, y = axis_serial[b]
        if x not in idx or y not in idx:
            raise PdbqtError(f"{where}: BRANCH {x} {y} names an atom that does not exist")
        axis[b] = idx[x], idx[y]
        if kbody[idx[y]] != b or kbody[idx[x]] != parent[b]:
            raise PdbqtError(f"{where}: BRANCH {x} {y}: atom {y} must open the branch and {x} belong to its parent")
    X = np.array(xyz)
    body = np.array(kbody, dtype=np.int64)
    # Vina's rigid pieces: the axis atom y belongs to the parent piece
    node = body.copy()
    axis_of = {}
    for b in range(1, nb):
        node[axis[b, 1]] = parent[b]
        axis_of.setdefault(int(axis[b, 0]), set()).add(b)
        axis_of.setdefault(int(axis[b, 1]), set()).add(b)

    def fixed(i: int, j: int) -> bool:
        if node[i] == node[j]:
            return True
        return node[j] in axis_of.get(i, ()) or node[i] in axis_of.get(j, ())

    bonds = _bonds(X, ad, fixed)
    xs = xs_types(ad, bonds)
    heavy = xs != NO_XS
    rot = {(int(min(a, b)), int(max(a, b))) for a, b in axis[1:]}
    # 1-2, 1-3, 1-4 neighbours (Vina bonded_to(i, 3), walking through hydrogens too)
    pairs = []
    n = len(ad)
    for i in range(n):
        if not heavy[i]:
            continue
        near = _bonded_within(bonds, i, 3)
        for j in range(i + 1, n):
            if heavy[j] and not fixed(i, j) and j not in near:
                pairs.append((i, j))
    # torsion count: rotatable bonds between heavy atoms that each have > 1 heavy neighbour
    n_heavy_nb = [sum(1 for k in bonds[i] if heavy[k]) for i in range(n)]
    num_tors = 0.0
    for i in range(n):
        if not heavy[i]:
            continue
        ar = sum(1 for j in bonds[i] if (min(i, j), max(i, j)) in rot and heavy[j] and n_heavy_nb[j] > 1)
        num_tors += 0.5 * ar
    if torsdof is None:
        raise PdbqtError(f"{where}: missing TORSDOF")
    return Ligand(X, ad, names, serials, np.array(charges), xs, body, np.array(parent), axis, bonds,
                  np.array(pairs, dtype=np.int64).reshape(-1, 2), num_tors, torsdof, lines)
