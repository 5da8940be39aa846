"""Time to target per policy at the SYMI paper's configuration, driven by our recorded training traces."""
