"""Live token shares against planned ones: imbalance, drops, simulated time to target and the executor's step time."""
