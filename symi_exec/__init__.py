"""The SYMI executor: trains a small MoE GPT with torch.distributed (gloo on CPU, NCCL on GPUs).

Imports torch; the simulator (symi_sim) and the CLI never import this package at module level.
"""
