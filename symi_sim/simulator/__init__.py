"""The timeline simulator behind `symi simulate`: cost formulas (costs), the simpy engine (engine), the driver that
replays a trace through every policy (driver), the planning replay shared with `symi plan --replay` (replay), and
the survival -> iterations-to-target curves (convergence, curves).

Imports the core, traces, failures and figures; never torch.
"""
