"""CPU schedule rules: gemm (see :mod:`graphopt.targets.schedules`)."""

from __future__ import annotations


def gemm_rules() -> list:
    """The rules of this family, most specific first."""
    return []
