"""AutoDock (AD4) and X-Score (XS) atom types as AutoDock Vina 1.2 defines them.

Constants are the published Vina values (src/lib/atom_constants.h): XS van der Waals radii,
covalent radii used to find bonds, and which XS types are hydrophobic, donors or acceptors.
"""

from __future__ import annotations

import numpy as np

# element classes (Vina EL_TYPE_*)
EL_H, EL_C, EL_N, EL_O, EL_S, EL_P, EL_F, EL_Cl, EL_Br, EL_I, EL_Si, EL_At, EL_Met = range(13)

# AD type name -> (element class, covalent radius Å, is heteroatom)
AD_TYPES: dict[str, tuple[int, float, bool]] = {
    "C": (EL_C, 0.77, False), "A": (EL_C, 0.77, False),
    "N": (EL_N, 0.75, True), "NA": (EL_N, 0.75, True),
    "O": (EL_O, 0.73, True), "OA": (EL_O, 0.73, True),
    "S": (EL_S, 1.02, True), "SA": (EL_S, 1.02, True), "Se": (EL_S, 1.02, True),
    "P": (EL_P, 1.06, True), "F": (EL_F, 0.71, True), "I": (EL_I, 1.33, True),
    "H": (EL_H, 0.37, False), "HD": (EL_H, 0.37, False),
    "Mg": (EL_Met, 1.30, True), "Mn": (EL_Met, 1.39, True), "Zn": (EL_Met, 1.31, True),
    "Ca": (EL_Met, 1.74, True), "Fe": (EL_Met, 1.25, True),
    "Cl": (EL_Cl, 0.99, True), "Br": (EL_Br, 1.14, True),
    "Si": (EL_Si, 1.11, True), "At": (EL_At, 1.44, True),
}
# metals AutoDock has no type for: Vina reads them as generic metal donors (Met_D)
AD_TYPES.update({m: (EL_Met, 1.75, True) for m in ("Cu", "Na", "K", "Hg", "Co", "U", "Cd", "Ni")})
MAX_COVALENT_RADIUS = 1.74  # largest covalent radius in the AD table (Ca)
BOND_ALLOWANCE = 1.1  # a bond: distance < 1.1 × (sum of covalent radii)

# XS types (Vina XS_TYPE_* order; the glue/closure types are not supported here)
XS_NAMES = ["C_H", "C_P", "N_P", "N_D", "N_A", "N_DA", "O_P", "O_D", "O_A", "O_DA", "S_P", "P_P",
            "F_H", "Cl_H", "Br_H", "I_H", "Si", "At", "Met_D"]
XS = {n: i for i, n in enumerate(XS_NAMES)}
N_XS = len(XS_NAMES)
NO_XS = -1  # hydrogens: not scored
XS_RADIUS = np.array([1.9, 1.9, 1.8, 1.8, 1.8, 1.8, 1.7, 1.7, 1.7, 1.7, 2.0, 2.1, 1.5, 1.8, 2.0, 2.2, 2.2, 2.3, 1.2])
XS_HYDROPHOBIC = np.isin(np.arange(N_XS), [XS["C_H"], XS["F_H"], XS["Cl_H"], XS["Br_H"], XS["I_H"]])
XS_ACCEPTOR = np.isin(np.arange(N_XS), [XS["N_A"], XS["N_DA"], XS["O_A"], XS["O_DA"]])
XS_DONOR = np.isin(np.arange(N_XS), [XS["N_D"], XS["N_DA"], XS["O_D"], XS["O_DA"], XS["Met_D"]])

_EL_XS = {EL_S: "S_P", EL_P: "P_P", EL_F: "F_H", EL_Cl: "Cl_H", EL_Br: "Br_H", EL_I: "I_H", EL_Si: "Si",
          EL_At: "At", EL_Met: "Met_D"}


def element_of(ad: str) -> int:
    return AD_TYPES[ad][0]


def xs_types(ad: list[str], bonds: list[list[int]]) -> np.ndarray:
    """XS type per atom from AD types and the bond graph (Vina model::assign_types).

    Carbon bonded to a heteroatom is polar (C_P), else hydrophobic (C_H). N/O: acceptor if the AD
    type says so (NA/OA), donor if bonded to a polar hydrogen (HD)."""
    out = np.full(len(ad), NO_XS, dtype=np.int32)
    for i, t in enumerate(ad):
        el = AD_TYPES[t][0]
        if el == EL_H:
            continue
        if el == EL_C:
            out[i] = XS["C_P"] if any(AD_TYPES[ad[j]][2] for j in bonds[i]) else XS["C_H"]
        elif el in (EL_N, EL_O):
            acc = t in ("NA", "OA")
            don = any(ad[j] == "HD" for j in bonds[i])
            e = "N" if el == EL_N else "O"
            out[i] = XS[f"{e}_DA" if acc and don else f"{e}_A" if acc else f"{e}_D" if don else f"{e}_P"]
        else:
            out[i] = XS[_EL_XS[el]]
    return out
