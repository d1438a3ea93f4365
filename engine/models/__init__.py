"""Model registry: one place that maps a job's `model.name` to a declaration."""

from __future__ import annotations

from kernels.ode.model import InfusionTarget, Model

from ..errors import JobError
from . import classic, glucose, oncology, pkpd_library
from . import circulation
from .pkpd import PK_1CMT, PK_2CMT

# Each library module lists its declarations in MODELS_HERE.
MODELS: dict[str, Model] = {
    m.name: m for m in (PK_1CMT, PK_2CMT, *pkpd_library.MODELS_HERE, *glucose.MODELS_HERE, *classic.MODELS_HERE,
                        *oncology.MODELS_HERE, *circulation.MODELS_HERE)
}


# Events a model needs besides doses, built per chunk: hook(model, P, events, t_end) -> events
# (circ_0d: one reset of the beat phase per heart beat, with beat lengths from the heart rate).
EVENT_HOOKS = {**circulation.EVENT_HOOKS}

def get_model(name: str) -> Model:
    try:
        return MODELS[name]
    except KeyError:
        raise JobError(f"key 'model.name' = {name!r}: unknown model; available: {', '.join(sorted(MODELS))}") from None


def job_model(loaded) -> Model:
    """The model a job runs: from the library by name, or declared in a TOML or SBML file."""
    cached = getattr(loaded, "_model", None)
    if cached is not None:
        return cached
    sec = loaded.job.model
    if sec.file is None:
        model = get_model(sec.name)
    else:
        path = loaded.resolve(sec.file)
        if not path.is_file():
            raise JobError(f"{loaded.path}: key 'model.file' = {sec.file!r}: file not found")
        try:
            if path.suffix.lower() == ".toml":
                from kernels.ode.model_toml import load_model_toml

                model = load_model_toml(path)
            elif path.suffix.lower() in (".xml", ".sbml"):
                from kernels.ode.sbml import import_sbml

                model = import_sbml(path, name=sec.name)
            elif path.suffix.lower() in (".cellml", ".mmt"):
                from kernels.ode.cellml import import_cellml, import_mmt

                model = (import_mmt if path.suffix.lower() == ".mmt" else import_cellml)(path)
            else:
                raise JobError(f"{loaded.path}: key 'model.file' = {sec.file!r}: expected a .toml, .xml/.sbml, "
                               ".cellml or .mmt file")
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise JobError(f"{loaded.path}: key 'model.file' = {sec.file!r}: {e}") from None
        if model.name != sec.name:
            raise JobError(f"{loaded.path}: key 'model.name' = {sec.name!r} but {sec.file} declares {model.name!r}")
    loaded._model = model
    return model


def check_job_against_model(loaded) -> None:
    """Checks that need the model: parameter, output, biomarker and dose-route names."""
    job, src = loaded.job, loaded.path
    model = job_model(loaded)
    pnames = model.parameter_names
    for k in job.model.parameters:
        if k not in pnames:
            raise JobError(f"{src}: key 'model.parameters.{k}': unknown parameter of {model.name}; allowed: {', '.join(pnames)}")
    typical = {**model.defaults(), **job.model.parameters}
    for p in model.parameters:
        if p.positive and typical[p.name] <= 0:
            raise JobError(f"{src}: key 'model.parameters.{p.name}' = {typical[p.name]}: must be > 0")
    if isinstance(job.solver.atol, dict):
        for k in job.solver.atol:
            if k != "default" and k not in model.state_names:
                raise JobError(f"{src}: key 'solver.atol.{k}': not a state of {model.name}; allowed: "
                               f"{', '.join(model.state_names)} or default")
    obs = model.observable()
    if job.controller is not None:
        from pydantic import ValidationError

        from ..config import format_validation_error
        from ..controllers import get_controller

        ctl = get_controller(job.controller.name)
        if ctl.models and model.name not in ctl.models:
            raise JobError(f"{src}: key 'controller.name' = {ctl.name!r} works with models {', '.join(ctl.models)}, "
                           f"not {model.name}")
        try:
            loaded._controller_settings = ctl.Settings.model_validate(job.controller.settings)
        except ValidationError as e:
            msg = format_validation_error(e, str(src)).replace("key '", "key 'controller.settings.")
            raise JobError(msg) from None
        ctl.check_job(loaded._controller_settings, loaded)
        obs = obs + list(ctl.signals)
    for i, v in enumerate(job.outputs.variables):
        if v not in obs:
            raise JobError(f"{src}: key 'outputs.variables[{i}]' = {v!r}: not an output of {model.name}; allowed: {', '.join(obs)}")
    for i, b in enumerate(job.outputs.biomarkers):
        if b.variable not in job.outputs.variables:
            raise JobError(
                f"{src}: key 'outputs.biomarkers[{i}].variable' = {b.variable!r}: must be one of outputs.variables {job.outputs.variables}"
            )
    coh = job.cohort
    names = ([*coh.variability.parameters] if coh.variability else []) + [e.parameter for e in coh.covariate_effects]
    if coh.csv:
        names += list(coh.csv.parameters)
    for n in names:
        if n not in pnames:
            raise JobError(f"{src}: cohort refers to parameter {n!r}, which {model.name} does not have; allowed: {', '.join(pnames)}")
    for a, arm in enumerate(job.arms):
        for d, dose in enumerate(arm.doses):
            if dose.route not in model.doses:
                raise JobError(
                    f"{src}: key 'arms[{a}].doses[{d}].route' = {dose.route!r}: {model.name} accepts {', '.join(model.doses)}"
                )
            infusion = isinstance(model.doses[dose.route], InfusionTarget)
            if infusion and dose.duration is None:
                raise JobError(f"{src}: key 'arms[{a}].doses[{d}]': route {dose.route!r} is an infusion and needs 'duration'")
            if not infusion and dose.duration is not None:
                raise JobError(
                    f"{src}: key 'arms[{a}].doses[{d}].duration' = {dose.duration}: only infusion routes take a duration, "
                    f"{dose.route!r} is a bolus"
                )
