"""dedup-initializers: merge initializers with identical dtype, shape and bytes."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.ir import GraphSurgeonPass, array, graph_outputs_of, replace_uses, subgraphs

log = logging.getLogger("graphopt.passes.dedup_initializers")


def _digest(t: gs.Constant) -> str:
    """sha256 of a constant's bytes, read from its TensorProto when it has raw data (no numpy copy)."""
    v = t._values
    if isinstance(v, LazyValues) and v.tensor.data_location == onnx.TensorProto.EXTERNAL:
        # Not loaded: only references to the same bytes of the same file count as equal.
        ref = sorted((e.key, e.value) for e in v.tensor.external_data if e.key != "checksum")
        return "external:" + hashlib.sha256(repr(ref).encode()).hexdigest()
    if isinstance(v, LazyValues) and v.tensor.HasField("raw_data"):
        return hashlib.sha256(v.tensor.raw_data).hexdigest()
    return hashlib.sha256(np.asarray(array(t), order="C").tobytes()).hexdigest()


def dedup_initializers(root: gs.Graph, keep_names: set[str] = frozenset()) -> tuple[int, int]:
    """Make readers of duplicate constants read the first one; returns (merged, bytes saved).

    Scoping is respected: a constant first seen in one branch is not reused in
    another. Never merged: constants that are graph outputs (their name is part
    of the interface) and ``keep_names`` (initializers that are also graph
    inputs, which a caller may override). Only constants of equal size are
    hashed, so large models are not read twice.
    """
    out_index = graph_outputs_of(root)
    merged = saved = 0

    def visit(g: gs.Graph, visible: dict) -> None:
        nonlocal merged, saved
        visible = dict(visible)
        consts: dict[int, gs.Constant] = {}
        for n in g.nodes:
            for t in n.inputs:
                if isinstance(t, gs.Constant):
                    consts.setdefault(id(t), t)
        sizes: dict[tuple, int] = {}
        for t in consts.values():
            k = (str(t.dtype), tuple(t.shape), t._values.nbytes)
            sizes[k] = sizes.get(k, 0) + 1
        for key, c in visible.items():
            sizes[key[:3]] = sizes.get(key[:3], 0) + 1
        for t in consts.values():
            if t.name in keep_names or id(t) in out_index:
                continue
            k3 = (str(t.dtype), tuple(t.shape), t._values.nbytes)
            if sizes[k3] < 2:
                continue
            key = k3 + (_digest(t),)
            first = visible.get(key)
            if first is None:
                visible[key] = t
            elif first is not t:
                replace_uses(t, first, out_index)
                merged += 1
                saved += t._values.nbytes
                log.debug("dedup-initializers: %s -> %s", t.name, first.name)
        for n in g.nodes:
            for sg in subgraphs(n):
                visit(sg, visible)

    visit(root, {})
    return merged, saved


class DedupInitializers(GraphSurgeonPass):
    """Merge initializers with identical dtype, shape and bytes into one.

    Changes: readers of a duplicate read the first copy (in node order), and the
    duplicate is dropped. Leaves alone: initializers that are graph outputs or
    also graph inputs, and constants in sibling branches (not visible to each
    other).
    """

    name = "dedup-initializers"
    lossless = True

    def rewrite(self, ir, ctx) -> None:
        merged, saved = dedup_initializers(ir.g, {v.name for v in ir.init_inputs})
        self.note("merged_initializers", merged)
        self.note("bytes_saved", saved)
