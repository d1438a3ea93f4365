"""Docking front end: ligand/receptor preparation, boxes, `twin dock`, and the screen job."""
