"""Rank failures and checkpointing: the closed-form expected cost (model) and failures injected into sampled job
timelines (injection).

Imports the shared core only.
"""
