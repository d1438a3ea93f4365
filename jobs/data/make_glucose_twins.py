"""Regenerate cgm_stream.csv / cgm_patients.csv (jobs/glucose_twins.toml): six synthetic type 1
twins (engine.calibrate.glucose), 12 h, two of them over-bolused (hypoglycaemia to alert on).
Run from the repository root: python jobs/data/make_glucose_twins.py"""
from pathlib import Path

from engine.calibrate.glucose import write_cgm_dataset

write_cgm_dataset(Path(__file__).parent, n=6, seed=17, hours=12.0, bolus_factors=[1.0, 1.0, 3.0, 1.0, 3.5, 1.0])
