"""CPU schedule rules: elementwise (see :mod:`graphopt.targets.schedules`)."""

from __future__ import annotations


def elementwise_rules() -> list:
    """The rules of this family, most specific first."""
    return []
