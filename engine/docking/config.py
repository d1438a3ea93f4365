"""The `[docking]` job: a compound library × one or more targets, validated like every job."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, ValidationError, model_validator

from ..config import JobSection, LoadedJob, Name, SlurmSection, Strict, format_validation_error
from ..errors import JobError

Vec3 = Annotated[list[float], Field(min_length=3, max_length=3)]


class Target(Strict):
    name: Name
    receptor: str  # rigid receptor PDBQT, relative to the job file
    center: Vec3 | None = None
    size: Vec3 | None = None
    autobox_ligand: str | None = None  # box = this ligand's extent + autobox_add (PDBQT or SDF)
    autobox_add: Annotated[float, Field(ge=0)] = 8.0

    @model_validator(mode="after")
    def _box(self):
        if self.autobox_ligand is None and (self.center is None or self.size is None):
            raise ValueError("give 'center' and 'size', or 'autobox_ligand'")
        if self.autobox_ligand is not None and (self.center is not None or self.size is not None):
            raise ValueError("'autobox_ligand' and 'center'/'size' are exclusive")
        if self.size is not None and min(self.size) <= 0:
            raise ValueError(f"size {self.size}: every side must be > 0 Å")
        return self


class DockingSection(Strict):
    library: str  # CSV (name + SMILES columns) or SDF with 3-D coordinates
    name_column: str = "name"
    smiles_column: str = "smiles"
    targets: Annotated[list[Target], Field(min_length=1)]
    exhaustiveness: Annotated[int, Field(ge=1, le=1024)] = 8
    num_modes: Annotated[int, Field(ge=1, le=50)] = 3  # poses kept per ligand × target
    energy_range: Annotated[float, Field(gt=0)] = 3.0
    min_rmsd: Annotated[float, Field(gt=0)] = 1.0
    steps_scale: Annotated[float, Field(gt=0, le=10)] = 1.0  # fraction of Vina's Monte Carlo steps
    largest_fragment: bool = False  # salts: dock the largest fragment instead of failing
    max_torsions: Annotated[int, Field(ge=0, le=64)] = 32
    max_atoms: Annotated[int, Field(ge=4, le=1024)] = 128  # hydrogens included

    @model_validator(mode="after")
    def _names(self):
        names = [t.name for t in self.targets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"target names must be unique; repeated: {dup}")
        return self


class DockingJob(Strict):
    job: JobSection
    docking: DockingSection
    slurm: SlurmSection | None = None


def is_docking(data) -> bool:
    return isinstance(data, dict) and "docking" in data


def parse_docking_job(data: dict, text: str, source: str, path) -> LoadedJob:
    try:
        job = DockingJob.model_validate(data)
    except ValidationError as e:
        raise JobError(format_validation_error(e, source)) from None
    loaded = LoadedJob(job, text, path)
    for i, t in enumerate(job.docking.targets):
        for key in ("receptor", "autobox_ligand"):
            val = getattr(t, key)
            if val is not None and not loaded.resolve(val).is_file():
                raise JobError(f"{source}: key 'docking.targets[{i}].{key}' = {val!r}: file not found")
    if not loaded.resolve(job.docking.library).is_file():
        raise JobError(f"{source}: key 'docking.library' = {job.docking.library!r}: file not found")
    return loaded
