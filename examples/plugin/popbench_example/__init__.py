"""An example popbench plugin: a method (mean_drift.py) and two task families (three_well.py, big_vortex.py)."""
