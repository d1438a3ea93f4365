"""Molecular docking kernels: the AutoDock Vina scoring function (NumPy reference), receptor grid
maps and Monte Carlo + BFGS search (C/OpenMP; CUDA source for the grid kernel)."""
