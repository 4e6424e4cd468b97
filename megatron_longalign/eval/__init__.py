"""Evaluation: generation backends, LongBench-Chat, needle-in-a-haystack, LongBench."""
