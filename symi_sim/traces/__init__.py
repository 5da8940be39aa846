"""Expert-load traces: the LoadTrace and its Parquet/CSV format (format), importers of other frameworks' records
(importers, with one readers_<framework> module each), what `--trace` accepts (resolve: shipped names, detected
formats), statistics (stats), synthetic traces (synth), and fitting a trace to a simulated model (fit).

Imports the shared core only (never the simulator, torch or simpy; the SGLang reader loads torch lazily, when a .pt
dump is read).
"""
