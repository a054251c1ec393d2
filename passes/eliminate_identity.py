"""eliminate-identity: remove Identity nodes and inference-mode Dropout."""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from graphopt.ir import GraphSurgeonPass, all_graphs, detach, drop_nodes, graph_outputs_of, label, replace_uses

log = logging.getLogger("graphopt.passes.eliminate_identity")


def _is_identity(node: gs.Node, output_names: set[str]) -> bool:
    if (node.domain or "") not in ("", "ai.onnx") or not node.inputs or node.inputs[0].is_empty() or not node.outputs:
        return False
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        mask_used = len(node.outputs) > 1 and not node.outputs[1].is_empty() and (
            node.outputs[1].outputs or node.outputs[1].name in output_names)
        training = len(node.inputs) > 2 and not node.inputs[2].is_empty()
        return not mask_used and not training
    return False


def eliminate_identity(root: gs.Graph) -> int:
    """Remove identities in ``root`` and every subgraph; returns how many. Linear in the graph size.

    Readers of an Identity's output read its input instead. When the output is
    one of its graph's outputs, the input's producer writes the output name
    directly, so graph output names never change; an Identity whose input is
    a graph input, a constant, another graph output or a value from an outer
    scope is then kept (removing it would merge two of the graph's names).
    """
    out_index = graph_outputs_of(root)
    output_names = {t.name for g in all_graphs(root) for t in g.outputs}
    removed = 0
    for g in list(all_graphs(root)):
        local = {id(n) for n in g.nodes}
        own_io = {id(t) for t in g.inputs} | {id(t) for t in g.outputs}
        dead = []
        for node in g.nodes:
            if not _is_identity(node, output_names):
                continue
            src, dst = node.inputs[0], node.outputs[0]
            if id(dst) in own_io:
                producer = src.inputs[0] if isinstance(src, gs.Variable) and len(src.inputs) == 1 else None
                if producer is None or id(producer) not in local or id(src) in own_io or id(src) in out_index:
                    continue
                detach(node)
                for i, t in enumerate(producer.outputs):
                    if t is src:
                        producer.outputs[i] = dst
                replace_uses(src, dst, out_index)
            else:
                replace_uses(dst, src, out_index)
                detach(node)
            dead.append(node)
            log.debug("eliminate-identity: removed %s", label(node))
        removed += drop_nodes(g, dead)
    return removed


class EliminateIdentity(GraphSurgeonPass):
    """Remove Identity nodes (and inference-mode Dropout) by wiring readers to their input.

    Changes: readers of the removed node's output, at any subgraph depth, read
    its input. Leaves alone: graph input and output names (an Identity that
    copies a graph input, an initializer, another output or an outer-scope
    value straight to a graph output stays), Dropout whose mask is used or
    that has a training-mode input.
    """

    name = "eliminate-identity"
    lossless = True

    def rewrite(self, ir, ctx) -> None:
        self.note("removed_nodes", eliminate_identity(ir.g))
