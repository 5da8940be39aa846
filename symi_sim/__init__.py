"""symi_sim: traces, clusters, placements, policies, routing and the discrete-event simulator.

numpy / pandas / simpy only: nothing in this package imports torch.
"""

__version__ = "0.1.0"
