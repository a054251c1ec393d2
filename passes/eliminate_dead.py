"""eliminate-dead: remove nodes and weights that no graph output depends on."""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from graphopt.ir import GraphSurgeonPass, all_graphs, drop_nodes, label, live_nodes

log = logging.getLogger("graphopt.passes.eliminate_dead")


def constant_names(root: gs.Graph) -> set[str]:
    """Names of the constants (initializers) read anywhere in ``root``."""
    return {t.name for g in all_graphs(root) for n in g.nodes for t in n.inputs if isinstance(t, gs.Constant)} | {
        t.name for g in all_graphs(root) for t in g.outputs if isinstance(t, gs.Constant)}


def eliminate_dead(root: gs.Graph) -> int:
    """Remove dead nodes from ``root`` and every subgraph; returns how many.

    A node is live when a graph output of its own graph depends on it; reads by
    subgraphs from outer scopes (node inputs and values a subgraph returns
    directly) keep their producers alive. Inner graphs are swept first, so an
    outer value that only a dead inner node read dies in the same sweep.
    """
    removed = 0
    for g in reversed(list(all_graphs(root))):
        live = live_nodes(g)
        dead = [n for n in g.nodes if id(n) not in live]
        for n in dead:
            log.debug("eliminate-dead: removed %s", label(n))
        removed += drop_nodes(g, dead)
    return removed


class EliminateDead(GraphSurgeonPass):
    """Remove nodes whose results nothing reads, unused initializers and stale value_info.

    Changes: nodes (at any subgraph depth) no graph output depends on are
    removed, and so are initializers and value_info entries nothing reads any
    more. Leaves alone: graph inputs (even unused ones: they are the model's
    interface), graph outputs, initializers a subgraph reads.
    """

    name = "eliminate-dead"
    lossless = True

    def rewrite(self, ir, ctx) -> None:
        before = constant_names(ir.g)
        self.note("removed_nodes", eliminate_dead(ir.g))
        self.note("removed_initializers", len(before - constant_names(ir.g)))
