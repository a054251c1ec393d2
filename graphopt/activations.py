"""Intermediate activations of a graph on calibration inputs: the one facility every data-aware pass reads.

A pass asks :meth:`graphopt.passbase.PassContext.activations` for the values of
some tensors of the graph *it was given* (after the passes before it), on the
calibration feeds; ONNX Runtime computes them with those tensors exposed as
extra outputs. Values stream feed by feed (:meth:`Activations.stream`), so a
pass that reduces them (ranges, histograms, Hessians) never holds the whole
set; :meth:`Activations.collect` concatenates along axis 0 under a byte cap.
Only tensors of the main graph can be read (not values inside If/Loop bodies).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import onnx

from .data import Feed
from .errors import DataError, ModelError
from .graph import Graph

#: Most bytes :meth:`Activations.collect` returns at once.
MAX_COLLECT_BYTES = 2 << 30


def main_graph_values(graph: Graph) -> set[str]:
    """Names of the values computed in the main graph (node outputs) and its inputs."""
    names = {i.name for i in graph.graph.input}
    for n in graph.graph.node:
        names.update(o for o in n.output if o)
    return names


class Activations:
    """Values of tensors of ``graph`` on ``feeds``, computed by ONNX Runtime.

    Sessions are built once per distinct set of requested names and kept, so a
    pass that reads the same tensors twice pays for one session.
    """

    def __init__(self, graph: Graph, feeds: Sequence[Feed]):
        self.graph = graph
        self.feeds = list(feeds)
        self._sessions: dict[tuple[str, ...], object] = {}
        self._known = main_graph_values(graph)
        self._types = {vi.name: vi for vi in graph.infer_shapes().graph.value_info}

    def _session(self, names: tuple[str, ...]):
        from .reference import reference_session

        if names in self._sessions:
            return self._sessions[names]
        unknown = [n for n in names if n not in self._known]
        if unknown:
            raise ModelError(f"{self.graph.source or 'model'}: cannot read activations of {unknown[:3]}: "
                             "not values of the main graph")
        g = self.graph.copy()
        have = {o.name for o in g.graph.output}
        for n in names:
            if n in have:
                continue
            vi = self._types.get(n)
            g.graph.output.append(vi if vi is not None else onnx.helper.ValueInfoProto(name=n))
        sess = reference_session(g)
        self._sessions[names] = sess
        return sess

    def stream(self, names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """For each feed in turn, ``{name: value}`` of the requested tensors."""
        names = tuple(dict.fromkeys(names))
        if not names:
            return
        sess = self._session(names)
        for i, feed in enumerate(self.feeds):
            try:
                values = sess.run(list(names), feed)
            except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own types
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(f"{self.graph.source or 'model'}: ONNX Runtime failed on calibration sample "
                                f"{i}: {msg}") from e
            yield {n: np.asarray(v) for n, v in zip(names, values)}

    def collect(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Every requested tensor over all feeds, concatenated along axis 0 (0-d values stacked)."""
        parts: dict[str, list[np.ndarray]] = {n: [] for n in dict.fromkeys(names)}
        total = 0
        for values in self.stream(list(parts)):
            for n, v in values.items():
                total += v.nbytes
                if total > MAX_COLLECT_BYTES:
                    raise DataError(f"{self.graph.source or 'model'}: the activations asked for add up to over "
                                    f"{MAX_COLLECT_BYTES} bytes on the calibration set; give fewer calibration samples")
                parts[n].append(v.reshape(1) if v.ndim == 0 else v)
        return {n: np.concatenate(v, axis=0) if v else np.empty((0,), np.float32) for n, v in parts.items()}
