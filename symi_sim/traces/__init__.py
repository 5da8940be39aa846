"""Expert-load traces: the LoadTrace and its Parquet/CSV format (format), importers of other frameworks' records
(importers), statistics (stats), synthetic traces (synth), and fitting a trace to a simulated model (fit).

Imports the shared core only (never the simulator, torch or simpy).
"""
