"""What-if scale-out from 16 to 2,048 GPUs: where each policy's iteration time goes, and time to target per policy."""
