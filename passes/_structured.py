"""prune(structure=channel): remove whole output channels (conv filters, hidden units) and everything tied to them.

The groups come from :func:`passes._channels.analyse`. In each group ``round(ratio * C)`` of its ``C``
channels go, the least important first:

* ``importance=activation`` (with calibration data): the energy a channel sends into the layers that read
  it, ``sum_j H_jj * ||W[:, j]||^2`` over the consumer's input columns ``j`` of that channel (``H = X^T X``
  of the consumer's calibration inputs), each consumer's share normalized so layers of different scale
  compare;
* ``importance=magnitude``: the producer's filter norm times the consumer's column norm, each normalized.

With ``compensate`` (default with data) every consumer is refit: its kept input columns and its bias move to
the least-squares optimum of reproducing its original output on the calibration inputs (the bias absorbs the
removed channels' mean; a Conv or Gemm without a bias gets one). The result is a smaller valid graph: fewer
channels, weights, FLOPs.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import ModelError, OptionError
from graphopt.graph import Graph
from graphopt.ir import IR, array
from graphopt.passbase import PassContext, first_reasons
from graphopt.stats import graph_stats

from . import _channels as ch
from ._emit import Namer, all_names, unit_gemm_beta
from .fold_constants import FoldConstants
from .quantize import Layer, Quantize, _constant

#: Relative damping of the refit's normal equations (of the mean diagonal), as in SparseGPT.
DAMP = 0.01


def prune_channels(p, graph: Graph, ctx: PassContext) -> Graph:
    """Run ``p`` (a :class:`passes.prune.Prune` with ``structure=channel``) on ``graph``."""
    o = p.opts
    where = f"{graph.source or 'model'}: prune(structure=channel)"
    # Per-channel constants computed in the graph (a bias Reshape-d from [C] to [1, C, 1, 1]) become plain
    # constants first, so they can be sliced with their channels (lossless; the only other change made).
    graph = unit_gemm_beta(FoldConstants().run(graph, ctx))  # a refit bias then acts as written
    before = graph_stats(graph)  # FLOPs and parameters on the same footing as after (the folded graph)
    layers, skipped = Quantize(mode="dynamic")._layers(graph)
    skipped = {k: why.replace("quantized", "pruned") for k, why in skipped.items()}
    ir = IR(graph)
    shapes = {k: v.shape for k, v in graph.infer_shapes().value_specs().items()}
    an = ch.analyse(ir.g, layers, skipped, shapes)
    groups, refused = an.groups()
    not_pruned = {**{k: f"its output channels {why}" for k, why in refused.items()}}
    if not groups:
        reasons = not_pruned or skipped or {"graph": "no Conv (group=1), Gemm or MatMul with a constant weight"}
        raise ModelError(f"{where} found no channel group it can prune ({first_reasons(reasons)}); nothing "
                         "was written")
    counts = []
    for spaces in groups:
        c = an.producers[spaces[0]].out_channels
        k = int(o.ratio * c + 0.5)
        if k >= c > 1:
            raise OptionError(f"pass 'prune': option 'ratio' = {o.ratio:g} would remove all {c} output channels of "
                              f"{spaces[0]}: use a smaller ratio")
        counts.append(0 if c == 1 else c - kept_channels(c - k, c, o.multiple))
    pruned = [(sp, k) for sp, k in zip(groups, counts) if k > 0]
    for spaces, k in zip(groups, counts):
        if k == 0:
            for sp in spaces:
                c = an.producers[sp].out_channels
                not_pruned[sp] = ("has a single output channel: it cannot lose one" if c == 1 else
                                  f"its {c} output channels keep all at ratio={o.ratio:g} (rounded per group)")
    if not pruned:
        raise ModelError(f"{where}: ratio={o.ratio:g} removes no channel of any group "
                         f"({first_reasons(not_pruned)}); use a larger ratio; nothing was written")
    groups, counts = [sp for sp, _ in pruned], [k for _, k in pruned]

    compensate = o.compensate if o.compensate is not None else not ctx.data.generated
    importance = o.importance if o.importance != "auto" else ("magnitude" if ctx.data.generated else "activation")
    cons_layers = list({c.layer.key: c.layer for c in an.consumers}.values())
    stats = {}
    if compensate or importance == "activation":
        stats = Quantize(mode="dynamic")._layer_stats(graph, cons_layers, ctx)

    removed: dict[str, np.ndarray] = {}
    per_group = []
    for spaces, k in zip(groups, counts):
        score = _scores(an, spaces, stats if importance == "activation" else None)
        order = np.lexsort((np.arange(score.size), score))  # stable: the lower index goes first on ties
        gone = np.zeros(score.size, bool)
        gone[order[:k]] = True
        for s in spaces:
            removed[s] = gone
        per_group.append({"layers": spaces, "channels": int(score.size), "removed": int(k)})

    result = _apply(ir, an, removed, stats if compensate else None)
    after = graph_stats(result)

    p.note("structure", "channel")
    p.note("ratio", o.ratio)
    p.note("importance", importance)
    p.note("compensate", bool(compensate))
    p.note("groups", per_group)

    if not_pruned or skipped:
        p.note("not_pruned", {**skipped, **not_pruned})
    p.note("flops", {"before": before.flops, "after": after.flops,
                     "cut": round(1 - after.flops / before.flops, 6) if before.flops else 0.0})
    p.note("params", {"before": before.params, "after": after.params})
    chans = sum(g["channels"] for g in per_group)
    gone = sum(g["removed"] for g in per_group)
    text = (f"{gone} of {chans} channels removed in {len(groups)} group(s); FLOPs {before.flops:,} -> "
            f"{after.flops:,} (-{1 - after.flops / max(before.flops, 1):.1%}), parameters {before.params:,} -> "
            f"{after.params:,}")
    if not_pruned:
        text += f"; left as is: {first_reasons(not_pruned)}"
    p.note("summary", text)
    return result


def kept_channels(keep: int, total: int, multiple: int) -> int:
    """``keep`` rounded to the nearest multiple of ``multiple`` (ties: down, so a ratio always removes
    something when it can), at least one multiple, at most ``total``; unchanged when ``total`` is below two
    multiples (nothing to round to)."""
    if multiple <= 1 or total < 2 * multiple:
        return keep
    lo = keep // multiple * multiple
    hi = lo + multiple
    rounded = hi if hi - keep < keep - lo else lo
    return min(max(rounded, multiple), total)


def _scores(an: ch.Analysis, spaces: list[str], stats: dict | None) -> np.ndarray:
    """Importance of each channel of the group made of ``spaces`` (higher: keep)."""
    c = an.producers[spaces[0]].out_channels
    total = np.zeros(c)
    members = set(spaces)
    for cons in an.consumers:
        if not members & set(cons.state.spaces()):
            continue
        la = cons.layer
        w2 = la.w2.astype(np.float64)
        energy = (w2 ** 2).sum(axis=0)
        if stats is not None:
            h = stats[la.key][0]["h"]
            energy = energy * (np.diag(h) if isinstance(h, np.ndarray) else 0.0)
        norm = energy.sum() or 1.0
        per_col = _per_channel(cons, energy / norm)
        for s, vals in per_col.items():
            if s in members:
                total += vals
    if stats is None:  # magnitude: the producers' side too
        prod = np.zeros(c)
        for s in spaces:
            la = an.producers[s]
            rows = (la.w2.astype(np.float64) ** 2).sum(axis=1)
            prod += rows / (rows.sum() or 1.0)
        total = np.sqrt(np.maximum(total, 0)) * np.sqrt(prod) if total.any() else prod
    return total


def _per_channel(cons: ch.Consumer, col_values: np.ndarray) -> dict[str, np.ndarray]:
    """``col_values`` (one per input column of the consumer) summed per channel of each space it reads."""
    la, st = cons.layer, cons.state
    k = int(np.prod(la.w.shape[2:])) if la.op == "Conv" else 1
    per = st.inner * k
    out, pos = {}, 0
    for s, n in st.segs:
        block = col_values[pos:pos + n * per].reshape(n, per).sum(axis=1)
        if s is not None:
            out[s] = out.get(s, 0) + block
        pos += n * per
    return out


def _refit(w2: np.ndarray, bias: np.ndarray | None, gone: np.ndarray, st: dict) -> tuple[np.ndarray, np.ndarray]:
    """Kept columns and bias of ``w2`` refit by least squares to the original output on inputs with
    statistics ``st`` (``h`` = X^T X, ``sum``, ``n``); ``bias`` None: no bias term (a MatMul)."""
    h, s, n = st["h"], st["sum"], st["n"]
    if not isinstance(h, np.ndarray) or n == 0:
        return w2, bias
    if bias is not None:
        ha = np.zeros((h.shape[0] + 1,) * 2)
        ha[:-1, :-1], ha[:-1, -1], ha[-1, :-1], ha[-1, -1] = h, s, s, n
        wa = np.concatenate([w2, bias[:, None]], axis=1)
        ga = np.append(gone, False)
    else:
        ha, wa, ga = h, w2, gone
    keep = ~ga
    a = ha[np.ix_(keep, keep)]
    a = a + DAMP * np.mean(np.diag(a)) * np.eye(a.shape[0])
    try:
        delta = np.linalg.solve(a, ha[np.ix_(keep, ga)] @ wa[:, ga].T)
    except np.linalg.LinAlgError:
        return w2, bias
    out = wa.copy()
    out[:, keep] += delta.T
    if not np.isfinite(out).all():
        return w2, bias
    return (out[:, :-1], out[:, -1]) if bias is not None else (out, None)


def _apply(ir: IR, an: ch.Analysis, removed: dict, stats: dict | None) -> Graph:
    nodes = {(n.name or n.outputs[0].name): n for n in ir.g.nodes}
    namer = Namer(all_names(ir.like.graph), 1)
    w2s: dict[str, np.ndarray] = {}
    biases: dict[str, np.ndarray | None] = {}
    col_keep: dict[str, np.ndarray] = {}

    def bias_of(la: Layer) -> np.ndarray | None:
        if la.key not in biases:
            node = nodes[la.key]
            biases[la.key] = array(_constant(node.inputs[2])).astype(np.float64) if la.bias is not None else None
        return biases[la.key]

    # consumers first: drop the removed channels' input columns, refit the rest
    by_layer: dict[str, list] = {}
    for cons in an.consumers:
        by_layer.setdefault(cons.layer.key, []).append(cons)
    for key, conss in by_layer.items():
        la = conss[0].layer
        gone = np.zeros(la.w2.shape[1], bool)
        for cons in conss:
            gone |= ch.consumer_columns(cons, removed)
        if not gone.any():
            continue
        w2 = la.w2.astype(np.float64)
        b = bias_of(la)
        node = nodes[key]
        if stats is not None:
            can_add = la.op in ("Conv", "Gemm") and (len(node.inputs) < 3 or node.inputs[2].is_empty())
            if b is None and can_add:
                b = np.zeros(la.out_channels)
            if b is not None or la.op == "MatMul":
                w2, b = _refit(w2, b, gone, stats[key][0])
            biases[key] = b
        w2s[key] = w2
        col_keep[key] = ~gone

    # producers: their removed output rows
    row_keep = {s: ~removed[s] for s in removed}
    order = {k: i for i, k in enumerate(nodes)}
    for key in sorted(set(w2s) | set(row_keep), key=order.__getitem__):
        la = an.producers.get(key) or by_layer[key][0].layer
        w2 = w2s.get(key, la.w2.astype(np.float64))
        b = biases.get(key, bias_of(la))
        rows = row_keep.get(key, np.ones(w2.shape[0], bool))
        cols = col_keep.get(key, np.ones(w2.shape[1], bool))
        w2 = w2[rows][:, cols]
        node = nodes[key]
        if la.layout == "rows":
            k = la.w.shape[2:]
            stored = w2.reshape((w2.shape[0], -1) + tuple(k)) if la.op == "Conv" else w2
        else:
            stored = w2.T
        _set_input(node, 1, np.ascontiguousarray(stored, dtype=np.float32), namer)
        if b is not None:
            _set_input(node, 2, np.ascontiguousarray(b[rows], dtype=np.float32), namer, f"{la.weight}_bias")

    for cp in an.coupled:
        gone = ch.state_mask(cp.state, removed)
        if not gone.any():
            continue
        _set_input(cp.node, cp.index, np.ascontiguousarray(np.compress(~gone, cp.value, axis=cp.axis)), namer)
    for node, st in an.depthwise:
        node.attrs["group"] = int((~ch.state_mask(st, removed)).sum())
    for node, st in an.reshapes:  # [N, C*H*W] -> [N, C'*H*W]: the batch dim as it was
        shape = array(_constant(node.inputs[1])).astype(np.int64).copy()
        gone = ch.state_mask(st, removed)
        if gone.any():
            shape[1] = int((~gone).sum()) * st.inner
            _set_input(node, 1, shape, namer)
    for s in removed:
        for t in an.touched.get(s, ()):
            t.shape = None
    ir.g.cleanup()
    return ir.to_graph()


def _set_input(node: gs.Node, index: int, value: np.ndarray, namer: Namer, hint: str = "") -> None:
    """Make ``value`` input ``index`` of ``node``: in place when that input is a constant only ``node``
    reads, else as a new constant (a shared one is never edited for another node)."""
    old = node.inputs[index] if index < len(node.inputs) and not node.inputs[index].is_empty() else None
    if isinstance(old, gs.Constant) and len(old.outputs) <= 1:
        old.values = value
        return
    const = gs.Constant(namer.fresh(hint or (old.name if old is not None else "pruned")), value)
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = const
