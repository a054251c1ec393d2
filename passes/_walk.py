"""Small helpers over ONNX protos shared by the built-in passes."""

from __future__ import annotations

from typing import Iterator

import onnx


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name read by a node of ``graph`` or of its subgraphs (outer-scope reads included)."""
    used: set[str] = set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        for sg in subgraphs(node):
            used |= used_names(sg)
    return used


def rename_uses(graph: onnx.GraphProto, old: str, new: str) -> int:
    """Make every reader of ``old`` (subgraphs included) read ``new``; returns the count."""
    n = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
                n += 1
        for sg in subgraphs(node):
            if not any(old in (v.name,) for v in sg.input) and not any(t.name == old for t in sg.initializer):
                n += rename_uses(sg, old, new)
    return n


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
        for sg in subgraphs(node):
            for name in used_names(sg):
                out.setdefault(name, []).append(node)
    return out


def node_label(node: onnx.NodeProto, index: int | None = None) -> str:
    return f"{node.op_type} '{node.name or (f'#{index}' if index is not None else node.output[0])}'"


def replace_all(field, items) -> None:
    """Set a repeated proto field to ``items`` (copied first: clearing the field detaches them)."""
    copies = []
    for x in items:
        c = type(x)()
        c.CopyFrom(x)
        copies.append(c)
    del field[:]
    field.extend(copies)
