"""An example graphopt plugin: the ``strip-docs`` pass and a node-count instrument.

Written the way an outside team would write one: it imports nothing but
graphopt's public API (``graphopt.Pass``, ``graphopt.Option``,
``graphopt.hookimpl``, ``graphopt.Graph``) and is found through the entry
point declared in this project's ``pyproject.toml``::

    [project.entry-points.graphopt]
    example = "graphopt_example_plugin"
"""

from __future__ import annotations

import graphopt

__version__ = "0.1.0"

#: The key the instrument adds to every pass record.
NODE_COUNT_KEY = "example.node_count"
#: The key the hook wrapper adds: which instruments (by plugin) ran inside it, in order.
WRAPPED_KEY = "example.wrapped_instruments"


def _clear_doc(msg) -> int:
    """Clear ``msg.doc_string``; 1 when there was one to clear."""
    if msg.doc_string:
        msg.ClearField("doc_string")
        return 1
    return 0


def _strip_node(node) -> int:
    n = _clear_doc(node)
    for attr in node.attribute:
        n += _clear_doc(attr)
        if attr.HasField("t"):
            n += _clear_doc(attr.t)
        for t in attr.tensors:
            n += _clear_doc(t)
        if attr.HasField("g"):
            n += _strip_graph(attr.g)
        for g in attr.graphs:
            n += _strip_graph(g)
    return n


def _strip_graph(graph) -> int:
    """Doc strings removed from ``graph``, its values, initializers, nodes and subgraphs."""
    n = _clear_doc(graph)
    for vi in (*graph.input, *graph.output, *graph.value_info):
        n += _clear_doc(vi)
    for t in graph.initializer:
        n += _clear_doc(t)
    for node in graph.node:
        n += _strip_node(node)
    return n


class StripDocs(graphopt.Pass):
    """Remove doc strings from the model, graph, nodes and subgraphs (optionally metadata too).

    Doc strings are free-form text an exporter leaves behind (often source
    locations or whole stack traces); they never affect what the model
    computes, so this pass is lossless. ``keep_metadata=false`` also clears
    the model's ``metadata_props`` (key/value pairs such as author or
    training run) for a model you are about to publish.
    """

    name = "strip-docs"
    lossless = True
    options = (
        graphopt.Option("keep_metadata", bool, True, "keep the model's metadata_props (false: clear them too)"),
    )

    def run(self, graph: graphopt.Graph, ctx) -> graphopt.Graph:
        out = graph.copy()
        model = out.model
        removed = _clear_doc(model) + _strip_graph(model.graph)
        for fn in model.functions:
            removed += _clear_doc(fn)
            for node in fn.node:
                removed += _strip_node(node)
        metadata = 0
        if not self.opts.keep_metadata:
            metadata = len(model.metadata_props)
            del model.metadata_props[:]
        self.note("doc_strings_removed", removed)
        self.note("metadata_props_removed", metadata)
        return out


@graphopt.hookimpl
def graphopt_register_passes():
    return [StripDocs]


@graphopt.hookimpl
def graphopt_pass_end(pass_, graph, record, context):
    """Instrument: record the node count of every pass's output graph."""
    record.details[NODE_COUNT_KEY] = len(graph.graph.node)


@graphopt.hookimpl(wrapper=True, specname="graphopt_pass_end")
def around_pass_end(pass_, graph, record, context):
    """Hook wrapper (pluggy's ``wrapper=True``): runs around every other ``graphopt_pass_end`` instrument.

    Code before ``yield`` runs before them, code after it once they are done:
    here it records which new details keys they added, a pattern for timing or
    guarding other instruments.
    """
    before = set(record.details)
    result = yield
    record.details[WRAPPED_KEY] = sorted(set(record.details) - before)
    return result
