"""Figures (PNG) from result tables and traces: one registry of what can be drawn (registry.FIGURES), drawn one at a
time by registry.save_figure or for whole run directories by registry.plot_run (`symi plot`).

Imports the core and traces only.
"""
