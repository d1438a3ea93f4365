"""Provenance of simglucose_reference_24h_nonoise.csv: the reference protocol of SOURCES.md run by
live simglucose 0.2.11 with the CGM noise replaced by zeros (the sensor then reads Gsub, clipped
to [39, 600]). Not part of the test suite (simglucose is not a dependency); run it in its own
environment:

    python3 -m venv /tmp/sg && /tmp/sg/bin/pip install simglucose==0.2.11
    /tmp/sg/bin/python tests/data/glucose/make_simglucose_nonoise.py [noise|nonoise]

With `noise` it reruns the committed simglucose_reference_24h.csv protocol (Dexcom seed 1) and
writes simglucose_reference_24h_noise_rerun.csv, which agrees with it to its 4 decimals.
BG statistics are over the 480 three-minute BG values after t = 0; total insulin is the sum of the
480 step-mean insulin rates (U/min) x 3 min.
"""

import itertools
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from simglucose.actuator.pump import InsulinPump
from simglucose.controller.basal_bolus_ctrller import BBController
from simglucose.patient.t1dpatient import T1DPatient
from simglucose.sensor.cgm import CGMSensor
from simglucose.simulation.env import T1DSimEnv
from simglucose.simulation.scenario import CustomScenario
from simglucose.simulation.sim_engine import SimObj

HERE = Path(__file__).resolve().parent


class NoiselessCGM(CGMSensor):
    def reset(self):
        super().reset()
        self._noise_generator = itertools.repeat(0.0)


def main(mode: str) -> None:
    start = datetime(2024, 1, 1, 0, 0, 0)
    rows = []
    for name in pd.read_csv(HERE / "vpatient_params.csv").Name:
        sensor = CGMSensor.withName("Dexcom", seed=1)
        if mode == "nonoise":
            sensor = NoiselessCGM(sensor._params, seed=1)
        scen = CustomScenario(start_time=start, scenario=[(7, 45), (12, 70), (18, 80)])
        env = T1DSimEnv(T1DPatient.withName(name), sensor, InsulinPump.withName("Insulet"), scen)
        sim = SimObj(env, BBController(), timedelta(hours=24), animate=False, path=None)
        sim.simulate()
        df = sim.results()
        bg, cgm, ins = df.BG.to_numpy()[1:], df.CGM.to_numpy()[1:], df.insulin.to_numpy()[:-1]
        assert len(bg) == 480 and np.isfinite(ins).all()
        rows.append(dict(patient=name, mean_BG=bg.mean(), min_BG=bg.min(), max_BG=bg.max(),
                         TIR_70_180_pct=100 * np.mean((bg >= 70) & (bg <= 180)), TBR_lt70_pct=100 * np.mean(bg < 70),
                         TAR_gt180_pct=100 * np.mean(bg > 180), mean_CGM=cgm.mean(), total_insulin_U=3 * ins.sum(),
                         n_samples=len(bg)))
    out = HERE / ("simglucose_reference_24h_nonoise.csv" if mode == "nonoise" else
                  "simglucose_reference_24h_noise_rerun.csv")
    pd.DataFrame(rows).to_csv(out, index=False, float_format="%.6f")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nonoise")
