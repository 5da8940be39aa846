"""symi_sim: everything of symi that needs no torch (numpy / pandas / simpy).

Layers, each importing only those above it (tests/test_import_rules.py checks this):
  core        checks, outputs, config_files, cluster, models, placement, placement_formats, routing, live_shares,
              live_bounds, live_reference, policies/:
              the numpy code that the simulator, the planner and the executor (symi_exec) share unchanged
  traces/     the trace format, importers, statistics, synthesis, fitting a trace to a model
  failures/   failure and checkpoint models (closed form and sampled)
  figures/    figures from result tables
  simulator/  cost formulas, the simpy engine, the driver, planning replay, convergence curves
"""

__version__ = "0.1.0"
