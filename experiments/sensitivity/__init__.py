"""Sensitivity of time to target and token survival to slots per GPU, top-k, the popularity window, the capacity
factor and the auxiliary-loss coefficient, for the main policies."""
