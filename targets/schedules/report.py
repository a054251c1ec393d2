"""Which schedule rule claims each fused TIR function: coverage checks and a debug switch.

:func:`schedule_report` answers, for an IRModule after fusion (before the
schedules are applied), ``[(function name, rule name or None), ...]``;
:func:`fused_module` produces such a module from an imported Relax module.
With ``GRAPHOPT_SCHEDULE_REPORT=1`` in the environment, :func:`report_pass`
(placed just before ``ApplyDefaultSchedule`` in a pipeline) prints the report
to stderr; without it the pass does nothing and costs nothing.
"""

from __future__ import annotations

import os
import sys

ENV_VAR = "GRAPHOPT_SCHEDULE_REPORT"


def rule_name(rule) -> str:
    return type(rule).__name__


def schedule_report(mod, target=None, rules=None) -> list[tuple[str, str | None]]:
    """For every PrimFunc of ``mod`` not yet scheduled: the name of the first rule that claims it, or None.

    ``rules`` defaults to :func:`graphopt.targets.schedules.default_rules`;
    ``target`` to the current one (``with target:``). Rules are only tried:
    ``mod`` is not changed. Sorted by function name.
    """
    import tvm
    from tvm import tirx

    from . import default_rules

    rules = default_rules() if rules is None else list(rules)
    target = target or tvm.target.Target.current(allow_none=False)
    out = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1:
            continue
        ftarget = func.attrs.get("target", None) if func.attrs is not None else None
        claimed = None
        for rule in rules:
            if rule.apply(func, ftarget or target, False) is not None:
                claimed = rule_name(rule)
                break
        out.append((gv.name_hint, claimed))
    return sorted(out)


def format_report(rows) -> str:
    """The report as text: one ``function  rule`` line each, then a count per rule."""
    counts: dict[str, int] = {}
    lines = []
    width = max((len(n) for n, _ in rows), default=0)
    for name, rule in rows:
        lines.append(f"  {name:<{width}}  {rule or '-- unscheduled --'}")
        counts[rule or "unscheduled"] = counts.get(rule or "unscheduled", 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return "schedule report (" + summary + ")\n" + "\n".join(lines)


def report_pass(rules=None):
    """A module pass printing :func:`schedule_report` to stderr when ``$GRAPHOPT_SCHEDULE_REPORT`` is set (else a no-op)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="graphopt.ScheduleReport")
    def _report(mod, _ctx):
        if os.environ.get(ENV_VAR, "") not in ("", "0"):
            print(format_report(schedule_report(mod, rules=rules)), file=sys.stderr)
        return mod

    return _report


def fused_module(mod, target):
    """``mod`` (an imported Relax module) after the CPU pipeline's passes up to fusion, before scheduling."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    with target:
        return tvm.transform.Sequential([*cpu.library_dispatch_passes(target), *cpu.legalize_passes(target)])(mod)
