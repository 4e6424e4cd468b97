"""torchrun worker scripts of the trainer and checkpoint tests (shared code: tests/helpers/)."""
