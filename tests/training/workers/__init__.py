"""torchrun worker scripts of the trainer tests, and helpers shared with the pytest side
(`common`)."""
