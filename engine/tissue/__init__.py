"""Cardiac tissue twins: the monodomain equation on a voxel grid, split over MPI ranks in slabs."""
