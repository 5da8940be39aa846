"""The resolution and size of every figure, in one place: a PNG is (width, height in inches) x DPI pixels."""

from __future__ import annotations

DPI = 110
COMPARISON_SIZE_IN = (10.0, 4.5)
REPLAY_SIZE_IN = (9.0, 4.0)
CDF_SIZE_IN = (10.0, 4.0)
TIMELINE_SIZE_IN = (9.0, 4.0)
LOSS_SIZE_IN = (10.0, 4.0)
DROPPED_SIZE_IN = (9.0, 4.0)
HEATMAP_WIDTH_IN = 8.0
HEATMAP_HEIGHT_IN = (1.2, 1.9)  # fixed part + per layer panel
