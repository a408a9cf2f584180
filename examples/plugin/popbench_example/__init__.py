"""An example popbench plugin: see mean_drift.py."""
