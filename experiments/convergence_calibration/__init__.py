"""Recalibrate the simulator's convergence model (symi_sim/simulator/convergence.py) from executor training runs."""
