"""CPU schedule rules: conv (see :mod:`graphopt.targets.schedules`)."""

from __future__ import annotations


def conv_rules() -> list:
    """The rules of this family, most specific first."""
    return []
