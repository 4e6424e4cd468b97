"""Evaluation of trained models (docs/EVALUATION.md): generation backends (generation.py),
LongBench-Chat with an LLM judge, needle-in-a-haystack, LongBench."""
