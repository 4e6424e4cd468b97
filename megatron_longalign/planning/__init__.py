"""Memory and layout planning: per-GPU memory estimates (memory.py) and ranked
TP/PP/CP/DP layouts (layouts.py). See docs/PLANNING.md."""
