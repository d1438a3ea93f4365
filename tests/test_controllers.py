"""The controller framework: segment-wise runs driven by a controller through `twin run`."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from engine.config import load_job
from engine.controllers import Controller, Settings, Signal, register
from engine.errors import JobError
from engine.parallel import SerialComm
from engine.runner import run
from tests.helpers import small_job


class _BolusSettings(Settings):
    amount: float


@register
class PeriodicBolus(Controller):
    """Test controller: an IV bolus into the central compartment at every control time."""

    name = "test_periodic_bolus"
    Settings = _BolusSettings
    observe = ["C"]
    signals = {"C_seen": Signal("mg/L", "concentration seen by the controller")}
    results = {"n_doses": Signal("1", "doses given")}

    def __init__(self, settings, period, ctx):
        super().__init__(settings, period, ctx)
        self.seen, self.n = [], np.zeros(len(ctx.index))

    def act(self, t, y, u, obs, alive):
        self.seen.append(obs["C"].copy())
        y[self.ctx.model.state_names.index("A_central")] += self.s.amount
        self.n += 1

    def signal_values(self):
        return {"C_seen": np.stack(self.seen, axis=1)}

    def result_values(self):
        return {"n_doses": self.n}


NO_DOSE_ARM = '[[arms]]\nname = "ctl"\n'
DOSE_ARM = ('[[arms]]\nname = "ctl"\n[[arms.doses]]\namount = 50.0\nroute = "iv_bolus"\ninterval = 6.0\ncount = 4\n')
OUT = 'times = { start = 0.0, stop = 24.0, step = 1.0 }\nvariables = ["C"]\n'


def _run(tmp_path, name, arms, extra="", outputs=OUT, backend="numpy"):
    text = small_job(name=name, n=20, chunk=7, arms=arms, outputs=outputs, extra=extra,
                     solver="rtol = 1e-10\natol = 1e-12").replace('backend = "numpy"', f'backend = "{backend}"')
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    assert run(load_job(p), tmp_path / name, SerialComm(), quiet=True) == 0
    return h5py.File(tmp_path / name / "RUN.h5", "r")


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_controller_bolus_equals_scheduled_doses(tmp_path, backend):
    ctl = '[controller]\nname = "test_periodic_bolus"\nperiod = 6.0\n[controller.settings]\namount = 50.0\n'
    with _run(tmp_path, "ctl", NO_DOSE_ARM, ctl, OUT.replace('["C"]', '["C", "C_seen"]'), backend) as a, \
            _run(tmp_path, "ref", DOSE_ARM, backend=backend) as b:
        np.testing.assert_allclose(a["C"][:], b["C"][:], rtol=1e-8, atol=1e-12)
        assert (a["biomarkers/n_doses"][:] == 4).all()
        # the controller saw the pre-dose trough at each control time: 0 at t=0, then > 0
        seen = a["C_seen"][:]
        assert (seen[:, 0] == 0).all() and (seen[:, 6] > 0).all()
        assert a["C_seen"].attrs["units"] == "mg/L"


def test_controller_settings_are_validated_by_name(tmp_path):
    ctl = '[controller]\nname = "test_periodic_bolus"\nperiod = 6.0\n[controller.settings]\namont = 50.0\n'
    p = tmp_path / "j.toml"
    p.write_text(small_job(arms=NO_DOSE_ARM, outputs=OUT, extra=ctl))
    with pytest.raises(JobError, match="controller.settings.amont"):
        load_job(p)
    p.write_text(small_job(arms=NO_DOSE_ARM, outputs=OUT, extra=ctl.replace("test_periodic_bolus", "nope")))
    with pytest.raises(JobError, match="controller.name"):
        load_job(p)
