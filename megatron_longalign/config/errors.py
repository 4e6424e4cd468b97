"""`ConfigError`: a configuration that cannot run, with every problem listed. It lives in
the schema layer so that every layer can raise it; the one validator that collects the
problems is `megatron_longalign/training/validate.py`."""

from __future__ import annotations


class ConfigError(ValueError):
    """The configuration cannot run; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


def raise_if_problems(problems: list[str]) -> None:
    """Raise ConfigError listing `problems`, if there is any."""
    if problems:
        raise ConfigError(problems)
