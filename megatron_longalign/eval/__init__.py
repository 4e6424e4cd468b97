"""Evaluation of trained models (docs/EVALUATION.md): generation backends
(generation.py) and the task runners built on them."""
