"""Channel groups for structured pruning: which output channels can be removed together, and what else changes.

A *space* is the output-channel axis of one producer layer (a Conv with ``group=1``, a Gemm or a MatMul with
a constant weight, as :meth:`Quantize._layers` finds them). Walking the main graph in topological order, each
tensor is given the spaces its channel axis is made of (``State``):

* ops that act per channel pass them through: activations, pools, Dropout/Identity, a BatchNormalization or
  a depthwise Conv (whose per-channel parameters are *coupled*: sliced with the channel), an elementwise op
  with a constant (coupled when it is per channel, e.g. a MatMul's bias Add);
* an elementwise op of two tracked activations (a residual Add) *joins* the spaces on both sides: they
  must lose the same channels;
* a Concat on the channel axis lays spaces side by side; a Flatten (or a Reshape that flattens
  ``[N, C, H, W]`` to ``[N, C*H*W]``) keeps the channels, each now ``H*W`` consecutive columns;
* a Conv/Gemm/MatMul layer reading a tracked tensor is a *consumer*: its weight's input columns of a removed
  channel go, and the rest are refit.

Anything else that reads a tracked tensor (a Transpose, a Reshape into attention heads, a graph output, a
grouped Conv, ...) makes its spaces unprunable, with the reason. Joined spaces form a *group* (union-find);
a group is pruned as one: the same channel indices leave every producer, coupled tensor and consumer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import array

from .quantize import Layer, _constant

#: Ops that map each channel to itself and keep the tensor's layout (unary, or extra inputs are scalars).
PASS_THROUGH = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Gelu", "Softplus",
    "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Erf", "Identity", "Dropout", "Mish", "Clip", "ThresholdedRelu",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Reciprocal", "Floor", "Ceil",
    "Round", "Sign", "Sin", "Cos",
}
#: Of those, the pools: they keep channels only on axis 1 of an [N, C, *spatial] tensor.
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"}
#: Elementwise ops of two inputs with numpy broadcasting.
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"}
#: Reductions that keep the channel axis when it is not among the reduced axes.
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1", "ReduceLogSumExp",
          "ReduceProd", "ReduceSumSquare"}
#: Per-channel normalizations whose inputs 1.. are [C] vectors.
PER_CHANNEL = {"BatchNormalization"}


@dataclass(frozen=True)
class State:
    """What a tensor's channel axis holds: ``segs`` ((space or None, channels), ...) in order along
    ``axis`` (of a tensor of ``rank``), each channel ``inner`` consecutive elements (``H*W`` after a
    Flatten, else 1). A segment of space None is fixed (e.g. a graph input concatenated in)."""

    segs: tuple
    axis: int
    rank: int
    inner: int = 1

    @property
    def channels(self) -> int:
        return sum(n for _, n in self.segs)

    def spaces(self) -> list[str]:
        return [s for s, _ in self.segs if s is not None]


@dataclass
class Consumer:
    """A layer whose input columns follow ``state``'s channels (``inner`` columns per channel, times the
    conv kernel's positions)."""

    layer: Layer
    state: State


@dataclass
class Coupled:
    """Input ``index`` of ``node``, a constant, sliced along ``axis`` with the channels of ``state`` (a bias,
    BatchNorm parameters, a depthwise Conv's weight)."""

    node: gs.Node
    index: int
    axis: int
    state: State

    @property
    def value(self) -> np.ndarray:
        return array(_constant(self.node.inputs[self.index]))


@dataclass
class Analysis:
    """The result of :func:`analyse`: producer layers by space, groups of joined spaces, the consumers and
    coupled constants, the tensors whose shapes change, and why spaces cannot be pruned."""

    producers: dict = field(default_factory=dict)  # space -> Layer
    consumers: list = field(default_factory=list)  # Consumer
    coupled: list = field(default_factory=list)  # Coupled
    depthwise: list = field(default_factory=list)  # (depthwise Conv node, State): its group is the channel count
    reshapes: list = field(default_factory=list)  # (Reshape node, State) flattening tracked channels
    touched: dict = field(default_factory=dict)  # space -> [tensor] whose shape depends on it
    bad: dict = field(default_factory=dict)  # space -> reason
    parent: dict = field(default_factory=dict)  # union-find over spaces

    def find(self, s: str) -> str:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def join(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb), key=self._order)
            self.parent[hi] = lo

    def _order(self, s: str) -> int:
        return list(self.producers).index(s)

    def refuse(self, state: State, why: str) -> None:
        for s in state.spaces():
            self.bad.setdefault(s, why)

    def groups(self) -> tuple[list[list[str]], dict[str, str]]:
        """(prunable groups, each a list of spaces in graph order; {space: why} for the others). A group is
        refused as a whole when any of its spaces is."""
        members: dict[str, list[str]] = {}
        for s in self.producers:
            members.setdefault(self.find(s), []).append(s)
        good, refused = [], {}
        for root, spaces in members.items():
            why = next((self.bad[s] for s in spaces if s in self.bad), None)
            if why is None:
                good.append(spaces)
            else:
                for s in spaces:
                    refused[s] = self.bad.get(s, why if len(spaces) == 1 else f"joined with a layer that {why}")
        return good, refused


def _node_key(node: gs.Node) -> str:
    return node.name or node.outputs[0].name


def _depthwise(node: gs.Node, channels: int) -> bool:
    w = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
    g = int(node.attrs.get("group", 1))
    return w is not None and g == channels and g > 1 and array(w).shape[:2] == (channels, 1)


def _const_couple(an: Analysis, node: gs.Node, st: State, other_t) -> bool:
    """Record ``other`` (the constant operand of an elementwise op on a tracked tensor) as coupled when it
    is per channel; True when that or a broadcast over channels (size 1 there) makes it safe."""
    shape = tuple(array(_constant(other_t)).shape)
    if len(shape) > st.rank:
        return False
    pos = len(shape) - (st.rank - st.axis)  # the channel axis in the constant's own dims
    if pos < 0 or shape[pos] == 1:
        return True
    if shape[pos] == st.channels * st.inner and st.inner == 1:
        an.coupled.append(Coupled(node, list(node.inputs).index(other_t), pos, st))
        return True
    return False


def _reduce_axes(node: gs.Node, rank: int) -> set[int] | None:
    """The axes a Reduce* node reduces (attribute or constant second input); None when not known."""
    if len(node.inputs) > 1 and not node.inputs[1].is_empty():
        c = _constant(node.inputs[1])
        if c is None:
            return None
        axes = array(c).reshape(-1).tolist()
    else:
        axes = node.attrs.get("axes")
    if axes is None or len(axes) == 0:
        return None if int(node.attrs.get("noop_with_empty_axes", 0)) else set(range(rank))
    return {int(a) % rank for a in axes}


def _flatten_of(node: gs.Node, st: State, shapes: dict) -> bool:
    """Whether ``node`` (Flatten or Reshape) turns ``[N, C, *spatial]`` with the channels on axis 1 into
    ``[N, C * prod(spatial)]``."""
    if st.axis != 1 or st.inner != 1:
        return False
    src, dst = shapes.get(node.inputs[0].name), shapes.get(node.outputs[0].name)
    if src is None or len(src) < 3 or not all(isinstance(d, int) and d > 0 for d in src[1:]):
        return False  # the columns per channel must be known
    if node.op == "Flatten":
        return int(node.attrs.get("axis", 1)) == 1
    shape = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None or array(shape).shape != (2,):
        return False  # a computed shape would keep the old channel count
    return (src is not None and dst is not None and len(dst) == 2 and len(src) >= 3 and
            all(isinstance(d, int) and d > 0 for d in src[1:]) and dst[1] == int(np.prod(src[1:])) and
            (dst[0] == src[0] or not isinstance(dst[0], int) or not isinstance(src[0], int)))


def analyse(g: gs.Graph, layers: list[Layer], skipped: dict, shapes: dict) -> Analysis:
    """Walk ``g`` (main graph, topologically sorted) and find the channel spaces, groups, consumers and
    coupled constants. ``layers`` and ``skipped`` are quantize's; ``shapes`` maps tensor names to inferred
    shapes (dims are ints or None/str when unknown)."""
    an = Analysis()
    by_key = {la.key: la for la in layers}
    state: dict[str, State] = {}
    tensors: dict[str, gs.Tensor] = {}
    outputs = {t.name for t in g.outputs}

    def rank_of(t) -> int | None:
        s = shapes.get(t.name)
        return len(s) if s is not None else None

    def carry(node: gs.Node, st: State) -> bool:
        """``node``'s first output carries ``st``; False (and ``st`` refused) when another of its outputs is
        used (a Dropout mask, BatchNormalization's running statistics): those would change shape unseen."""
        extra = [o for o in node.outputs[1:] if o.outputs or o.name in outputs]
        if extra:
            an.refuse(st, f"reach {node.op} {_node_key(node)}, whose output {extra[0].name!r} is used too")
            return False
        out = node.outputs[0]
        state[out.name] = st
        tensors[out.name] = out
        for s in st.spaces():
            an.touched.setdefault(s, []).append(out)
        return True

    for node in g.nodes:
        key = _node_key(node)
        ins = [state.get(t.name) if isinstance(t, gs.Variable) else None for t in node.inputs]
        tracked = [s for s in ins if s is not None]
        out = node.outputs[0] if node.outputs else None
        la = by_key.get(key)
        if node.op in ("Conv", "Gemm", "MatMul") and any(s is not None for s in ins[1:]):
            for s in ins[1:]:
                if s is not None:
                    an.refuse(s, f"are read as a weight or bias by {node.op} {key}")
            continue
        if node.op in ("Conv", "Gemm", "MatMul") and ins[0] is not None:
            st = ins[0]
            grouped = node.op == "Conv" and int(node.attrs.get("group", 1)) != 1
            if la is None:
                an.refuse(st, f"are read by {node.op} {key}, which cannot be changed "
                              f"({skipped.get(key, 'its weight is not a constant')})")
            elif grouped:
                has_bias = len(node.inputs) > 2 and not node.inputs[2].is_empty()
                if _depthwise(node, st.channels) and st.inner == 1 and st.axis == 1 and \
                        (la.bias is not None or not has_bias):
                    an.coupled.append(Coupled(node, 1, 0, st))
                    an.depthwise.append((node, st))
                    if has_bias:
                        an.coupled.append(Coupled(node, 2, 0, st))
                    carry(node, st)
                    continue
                an.refuse(st, f"feed Conv {key} with group={node.attrs.get('group')} (only a depthwise conv with "
                              "one filter per input channel follows its input's channels)")
                continue
            elif node.op == "Conv" and (st.axis != 1 or st.inner != 1):
                an.refuse(st, f"reach Conv {key} on another axis")
            elif node.op == "Gemm" and (int(node.attrs.get("transA", 0)) or st.rank != 2 or st.axis != 1):
                an.refuse(st, f"reach Gemm {key} on another axis")
            elif node.op == "MatMul" and st.axis != st.rank - 1:
                an.refuse(st, f"reach MatMul {key} on another axis than its last")
            else:
                an.consumers.append(Consumer(la, st))
        if node.op in ("Conv", "Gemm", "MatMul") and la is not None and la.layout != "act" and out is not None:
            if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
                continue
            r = rank_of(out) or (la.w.ndim if node.op == "Conv" else 2 if node.op == "Gemm" else None)
            if r is None:
                continue
            space = key
            an.producers[space] = la
            an.parent[space] = space
            st = State(((space, la.out_channels),), 1 if node.op == "Conv" else r - 1, r)
            has_bias = len(node.inputs) > 2 and not node.inputs[2].is_empty()
            if has_bias and la.bias is None:  # a [1, N] Gemm C, a bias shared or computed: not sliceable here
                an.bad[space] = "have a bias that is not a per-channel constant of this layer alone"
            state[out.name] = st
            tensors[out.name] = out
            an.touched.setdefault(space, []).append(out)
            continue
        if not tracked:
            continue
        first = next(s for s in ins if s is not None)
        if node.op in PASS_THROUGH and all(s is None for s in ins[1:]) and \
                all(_constant(t) is not None and array(_constant(t)).size == 1 for t in node.inputs[1:]
                    if not t.is_empty()):
            if node.op in POOLS and (first.axis != 1 or first.inner != 1 or first.rank < 3):
                an.refuse(first, f"reach {node.op} {key} on another axis than a pool's channels")
                continue
            carry(node, first)
            continue
        if node.op in PER_CHANNEL and ins[0] is not None and first.axis == 1 and first.inner == 1 and \
                all(_constant(t) is not None for t in node.inputs[1:]):
            if carry(node, first):
                for i in range(1, len(node.inputs)):
                    an.coupled.append(Coupled(node, i, 0, first))
            continue
        if node.op in BINARY and len(node.inputs) == 2 and len(tracked) >= 1:
            a, b = ins
            if a is not None and b is not None:
                if a.axis != b.axis or a.rank != b.rank or a.inner != b.inner or \
                        [n for _, n in a.segs] != [n for _, n in b.segs] or \
                        any((x is None) != (y is None) for (x, _), (y, _) in zip(a.segs, b.segs)):
                    an.refuse(a, f"meet differently laid out channels at {node.op} {key}")
                    an.refuse(b, f"meet differently laid out channels at {node.op} {key}")
                    continue
                for (x, _), (y, _) in zip(a.segs, b.segs):
                    if x is not None:
                        an.join(x, y)
                st = a
            else:
                st = a if a is not None else b
                other = node.inputs[1] if a is not None else node.inputs[0]
                c = _constant(other)
                ok = c is not None and _const_couple(an, node, st, other)
                if not ok and c is None:
                    r = rank_of(other)
                    s = shapes.get(other.name)
                    pos = None if r is None else r - (st.rank - st.axis)
                    ok = s is not None and r is not None and r <= st.rank and (pos < 0 or s[pos] == 1)
                if not ok:
                    an.refuse(st, f"meet a per-element operand at {node.op} {key}")
                    continue
            carry(node, st)
            continue
        if node.op in REDUCE and ins[0] is not None and first.inner == 1 and all(x is None for x in ins[1:]):
            axes = _reduce_axes(node, first.rank)
            if axes is not None and first.axis not in axes:
                keep = int(node.attrs.get("keepdims", 1))
                st = State(first.segs, first.axis if keep else first.axis - sum(a < first.axis for a in axes),
                           first.rank if keep else first.rank - len(axes))
                carry(node, st)
                continue
        if node.op == "Concat":
            axis = int(node.attrs.get("axis", 0))
            segs, ok = [], True
            for t, s in zip(node.inputs, ins):
                r = rank_of(t) if s is None else s.rank
                if r is None or r != first.rank:
                    ok = False
                    break
                ax = axis % r
                if s is None:
                    dims = shapes.get(t.name)
                    if dims is None or not isinstance(dims[ax], int):
                        ok = False
                        break
                    segs.append((None, dims[ax]))
                elif s.axis != ax or s.inner != 1:
                    ok = False
                    break
                else:
                    segs.extend(s.segs)
            if not ok:
                for s in tracked:
                    an.refuse(s, f"reach Concat {key} on another axis")
                continue
            carry(node, State(tuple(segs), axis % first.rank, first.rank))
            continue
        if node.op in ("Flatten", "Reshape") and ins[0] is not None and all(s is None for s in ins[1:]) and \
                _flatten_of(node, first, shapes):
            src = shapes[node.inputs[0].name]
            st = State(first.segs, 1, 2, int(np.prod(src[2:])))
            if carry(node, st) and node.op == "Reshape":
                an.reshapes.append((node, st))
            continue
        for s in tracked:
            an.refuse(s, f"are read by {node.op} {key}")
    main = {id(n) for n in g.nodes}
    for name, st in state.items():
        if name in outputs:
            an.refuse(st, f"reach graph output {name!r}")
        elif any(id(c) not in main for c in tensors[name].outputs):
            an.refuse(st, f"are read inside an If/Loop/Scan body ({name!r})")
    return an


def consumer_columns(c: Consumer, removed: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean mask over ``c.layer``'s ``w2`` columns: True for the columns of removed channels."""
    la, st = c.layer, c.state
    k = int(np.prod(la.w.shape[2:])) if la.op == "Conv" else 1
    per_channel = []
    for space, n in st.segs:
        gone = removed.get(space) if space is not None else None
        per_channel.append(np.zeros(n, bool) if gone is None else gone)
    chan = np.concatenate(per_channel) if per_channel else np.zeros(0, bool)
    cols = np.repeat(chan, st.inner * k)
    if cols.size != la.w2.shape[1]:
        raise ValueError(f"layer {la.key}: {cols.size} columns from the channel walk, weight has {la.w2.shape[1]}")
    return cols


def state_mask(st: State, removed: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean mask over ``st``'s channels: True where removed."""
    parts = [np.zeros(n, bool) if s is None or s not in removed else removed[s] for s, n in st.segs]
    return np.concatenate(parts) if parts else np.zeros(0, bool)
