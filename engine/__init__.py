"""twin-engine: batch simulation of virtual patient cohorts for healthcare digital twins."""

__version__ = "0.1.0"
