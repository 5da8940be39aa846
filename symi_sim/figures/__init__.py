"""Figures (PNG) from result tables and traces, drawn for whole run directories by `symi plot`.

Imports the core and traces only.
"""
