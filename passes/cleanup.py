"""cleanup: every lossless clean-up, on one imported graph, to a fixpoint."""

from __future__ import annotations

from graphopt.ir import GraphSurgeonPass
from graphopt.options import Option

from .dedup_initializers import DedupInitializers, dedup_initializers
from .eliminate_dead import EliminateDead, constant_names, eliminate_dead
from .eliminate_identity import EliminateIdentity, eliminate_identity
from .fold_constants import FoldConstants, FoldStats, fold, report

# The single passes used to live here; importing them from this module keeps working.
__all__ = ["Cleanup", "DedupInitializers", "EliminateDead", "EliminateIdentity", "FoldConstants"]


class Cleanup(GraphSurgeonPass):
    """All lossless clean-ups (fold-constants, eliminate-identity, eliminate-dead, dedup-initializers) to a fixpoint.

    Imports the model once, runs every step on the same graph (each step is the
    function behind the single pass of that name, with its defaults), repeats
    while a round changes something, and exports once. Records per-step totals
    as ``<step>.<count>``. Leaves alone what each step leaves alone; in
    particular folding never undoes compression (see fold-constants).
    """

    name = "cleanup"
    lossless = True
    options = (Option("max_rounds", int, 4, "repeat the clean-ups at most this many times", min=1),)

    def rewrite(self, ir, ctx) -> None:
        stats = FoldStats()
        folding = FoldConstants().opts  # fold-constants' defaults, not a second copy of them
        ident = dead = merged = saved = 0
        before = constant_names(ir.g)
        for _ in range(self.opts.max_rounds):
            folded_before = stats.folded + stats.inlined_ifs
            fold(ir, ctx, cap_bytes=folding.max_mb * (1 << 20), rounds=folding.max_rounds, stats=stats)
            i = eliminate_identity(ir.g)
            d = eliminate_dead(ir.g)
            m, b = dedup_initializers(ir.g, {v.name for v in ir.init_inputs})
            ident, dead, merged, saved = ident + i, dead + d, merged + m, saved + b
            if not (i or d or m or stats.folded + stats.inlined_ifs > folded_before):
                break
        report(self, stats, prefix="fold-constants.")
        self.note("eliminate-identity.removed_nodes", ident)
        self.note("eliminate-dead.removed_nodes", dead)
        self.note("eliminate-dead.removed_initializers", len(before - constant_names(ir.g)))
        self.note("dedup-initializers.merged_initializers", merged)
        self.note("dedup-initializers.bytes_saved", saved)
