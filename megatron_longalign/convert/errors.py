"""The one exception type of the converter: bad input (not a bug), reported to the user
as a single line by tools/convert_hf.py (exit code 2)."""

from __future__ import annotations


class ConversionError(ValueError):
    """The input cannot be converted; the message names the file, tensor or key."""


class UnsupportedModelError(ConversionError):
    """The HF architecture or one of its settings has no equivalent in this trainer."""
