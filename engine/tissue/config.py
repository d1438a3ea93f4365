"""The `[tissue]` job: pydantic models (strict, unknown keys rejected) for monodomain tissue runs.

A tissue job has `[job]` (name, backend) and `[tissue]` instead of cohort/arms/outputs. Units:
mm, ms, mV; conductivities in S/m, chi in 1/mm, Cm in uF/mm^2, stimulus current in uA/mm^3.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from engine.config import Name, NonNeg, Pos, SlurmSection, Strict

Vec3 = Annotated[list[float], Field(min_length=3, max_length=3)]
PosVec3 = Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)]
NonNegVec3 = Annotated[list[Annotated[float, Field(ge=0)]], Field(min_length=3, max_length=3)]


class TissueJobSection(Strict):
    name: Name
    description: str = ""
    backend: Literal["auto", "numpy", "cpu", "cuda"] = "auto"


class CellSection(Strict):
    file: str  # CellML (.cellml) or Myokit (.mmt) file, relative to the job file
    parameters: dict[str, float] = Field(default_factory=dict)


class GeometrySection(Strict):
    """A box of `size_mm`, or a voxel image (engine/tissue/images.py: .npy/.npz, NIfTI .nii/.nii.gz,
    NRRD .nrrd): a boolean/0-1 mask, or a label map with `labels` naming the tissue labels."""

    size_mm: NonNegVec3 | None = None  # 0 on an axis: one node thick (a sheet or a cable)
    file: str | None = None
    labels: Annotated[list[int], Field(min_length=1)] | None = None  # label-map values that are tissue

    @model_validator(mode="after")
    def _one(self):
        if (self.size_mm is None) == (self.file is None):
            raise ValueError("give exactly one of size_mm (a box) or file (a voxel image: .npy, .npz, .nii, "
                             ".nii.gz, .nrrd)")
        if self.labels is not None and self.file is None:
            raise ValueError("labels choose tissue in a label-map file: give file too")
        return self


class ConductivitySection(Strict):
    """Monodomain conductivities: sigma_long/sigma_trans directly, or the intra/extracellular four
    (the monodomain value is their harmonic mean per direction, as the Niederer benchmark does)."""

    sigma_long: Pos | None = None
    sigma_trans: Pos | None = None
    sigma_il: Pos | None = None
    sigma_it: Pos | None = None
    sigma_el: Pos | None = None
    sigma_et: Pos | None = None
    chi: Pos = 140.0  # surface-to-volume ratio, 1/mm
    cm: Pos = 0.01  # membrane capacitance, uF/mm^2

    @model_validator(mode="after")
    def _pairs(self):
        direct = self.sigma_long is not None and self.sigma_trans is not None
        four = all(v is not None for v in (self.sigma_il, self.sigma_it, self.sigma_el, self.sigma_et))
        anyfour = any(v is not None for v in (self.sigma_il, self.sigma_it, self.sigma_el, self.sigma_et))
        if direct == four or (direct and anyfour):
            raise ValueError("give sigma_long and sigma_trans, or all of sigma_il, sigma_it, sigma_el, sigma_et")
        return self


class FibreSection(Strict):
    direction: Vec3 | None = None  # uniform fibre direction
    file: str | None = None  # per-voxel fibre vectors: .npy/.npz [3, NX, NY, NZ]; NIfTI/NRRD 3-component images

    @model_validator(mode="after")
    def _one(self):
        if (self.direction is None) == (self.file is None):
            raise ValueError("give exactly one of direction or file")
        if self.direction is not None and not any(self.direction):
            raise ValueError(f"direction {self.direction} must be a non-zero vector")
        return self


class Region(Strict):
    """A box [lo_mm, hi_mm] or a ball (centre_mm, radius_mm)."""

    lo_mm: Vec3 | None = None
    hi_mm: Vec3 | None = None
    centre_mm: Vec3 | None = None
    radius_mm: Pos | None = None

    @model_validator(mode="after")
    def _shape(self):
        box = self.lo_mm is not None and self.hi_mm is not None
        ball = self.centre_mm is not None and self.radius_mm is not None
        if box == ball or (box and (self.centre_mm or self.radius_mm)) or (ball and (self.lo_mm or self.hi_mm)):
            raise ValueError("give lo_mm and hi_mm (a box) or centre_mm and radius_mm (a ball)")
        if box and any(h < l for l, h in zip(self.lo_mm, self.hi_mm)):
            raise ValueError(f"hi_mm {self.hi_mm} must be >= lo_mm {self.lo_mm} on every axis")
        return self


class StimulusSection(Region):
    start: NonNeg = 0.0  # ms
    duration: Pos = 2.0  # ms
    current: Pos = 50.0  # uA/mm^3 injected (depolarising); divided by chi*Cm for the cell model
    period: NonNeg = 0.0  # ms between pulses (0: one pulse)
    count: Annotated[int, Field(ge=1, le=100000)] = 1

    @model_validator(mode="after")
    def _train(self):
        if self.count > 1 and self.period <= self.duration:
            raise ValueError(f"period = {self.period} ms must exceed duration = {self.duration} ms for count > 1")
        return self


class Electrode(Strict):
    name: Name
    position_mm: Vec3


class TissueOutputs(Strict):
    points: dict[Name, Vec3] = Field(default_factory=dict)  # traces of V and activation times here
    trace_every: Pos = 1.0  # ms between trace and ECG samples
    electrodes: list[Electrode] = Field(default_factory=list)  # pseudo-ECG
    sigma_bath: Pos = 0.2  # S/m, homogeneous extracellular conductivity of the lead field
    maps: bool = True  # activation / APD maps in RUN.h5


class Candidate(Strict):
    name: Name
    kind: Literal["pacing", "ablation"]
    region: Region


class PlanningSection(Strict):
    """Try candidates on the same twin; rank them. Candidates are spread over the MPI ranks."""

    objective: Literal["total_activation_time", "reentry"] = "total_activation_time"
    candidates: Annotated[list[Candidate], Field(min_length=1)]
    # pacing candidates replace the job's stimuli by this pulse at the candidate's region
    pulse_start: NonNeg = 0.0
    pulse_duration: Pos = 2.0
    pulse_current: Pos = 50.0
    # pacing candidates add their pulse to the job's stimuli instead of replacing them (an S2 after
    # the job's S1: e.g. an S1-S2 protocol that tests which site induces re-entry)
    keep_stimuli: bool = False

    @model_validator(mode="after")
    def _names(self):
        n = [c.name for c in self.candidates]
        dup = sorted({x for x in n if n.count(x) > 1})
        if dup:
            raise ValueError(f"candidate names must be unique; repeated: {dup}")
        return self


class TissueSection(Strict):
    cell: CellSection
    geometry: GeometrySection
    conductivity: ConductivitySection
    fibres: FibreSection = FibreSection(direction=[1.0, 0.0, 0.0])
    stimuli: Annotated[list[StimulusSection], Field(min_length=1)]
    dx: Pos  # mm, the same on every axis
    dt: Pos  # ms
    end_time: Pos  # ms
    diffusion_substeps: Annotated[int, Field(ge=1, le=1000)] = 1
    # stop early once every tissue voxel has activated and this many ms have passed since
    stop_after_activation: NonNeg | None = None
    activation_threshold: float = 0.0  # mV, up-crossing
    repolarisation_threshold: float = -70.0  # mV, down-crossing that ends the APD
    # cell step reads V-only rates from lookup tables (0.01 mV steps; kernels/tissue/tables.py) on
    # the cpu and cuda backends; false: exact formulas everywhere (the numpy backend always is)
    lookup_tables: bool = True
    outputs: TissueOutputs = TissueOutputs()
    planning: PlanningSection | None = None
    # wall-clock seconds between checkpoints of the full state in RUN_DIR/checkpoint (0: at every
    # trace sample); a killed `twin run` resumes from the last one (engine/tissue/checkpoint.py)
    checkpoint_every_s: NonNeg = 300.0

    @model_validator(mode="after")
    def _times(self):
        if self.dt > self.end_time:
            raise ValueError(f"dt = {self.dt} ms exceeds end_time = {self.end_time} ms")
        if self.repolarisation_threshold >= self.activation_threshold:
            raise ValueError("repolarisation_threshold must be below activation_threshold")
        return self


class TissueJob(Strict):
    job: TissueJobSection
    tissue: TissueSection
    slurm: SlurmSection | None = None  # `twin submit` resources, as for cohort jobs
