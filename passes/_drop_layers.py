"""distill(method=drop-layers,count=K): remove the K residual blocks that matter least, refit what follows.

A *residual block* is an ``Add(x, f(x))`` of the main graph whose branch ``f`` reads nothing from outside but
``x`` and constants, and whose nodes nobody else reads (the skip path ``x`` is read by the branch and the
Add). Dropping it makes the Add an Identity of ``x``: the branch becomes dead and goes.

Which blocks go: greedily, the one whose removal (together with those already removed) moves the model's
outputs least on the calibration data (relative squared error summed over outputs), measured with ONNX
Runtime; above :data:`GREEDY_RUNS` trial runs each block is measured once alone and the K lowest go.

What follows is refit: each Conv/Gemm/MatMul layer first reached from a dropped block's output gets the
weights and bias that best reproduce, in least squares, its original output (on the original model's
inputs) from its new inputs: ``W' = argmin ||X_new W'^T - X_old W^T||``, with the cross moment
``X_new^T X_old`` taken on the calibration data.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import GraphoptError, ModelError, OptionError
from graphopt.graph import Graph
from graphopt.ir import IR, array
from graphopt.passbase import PassContext
from graphopt.reference import run_reference

from ._emit import unit_gemm_beta
from .quantize import HESSIAN_ROWS, Layer, Quantize, _constant, _input_rows

#: Most trial runs of the greedy search (blocks x count) before blocks are ranked once, alone.
GREEDY_RUNS = 64
#: Relative damping of the refit's normal equations.
DAMP = 0.01


def _key(node: gs.Node) -> str:
    return node.name or node.outputs[0].name


def residual_blocks(g: gs.Graph, specs: dict) -> list[tuple[str, int, list[str]]]:
    """(Add node key, index of the skip input, keys of the branch's nodes) for each residual block of ``g``
    in graph order. ``specs`` (name -> TensorSpec, inferred) must show the Add's output float and shaped
    exactly as its skip input (a broadcasting Add, or integer shape arithmetic, is not a block)."""
    outputs = {id(t) for t in g.outputs}
    blocks = []
    for add in g.nodes:
        if add.op != "Add" or len(add.inputs) != 2 or any(not isinstance(t, gs.Variable) for t in add.inputs):
            continue
        if add.inputs[0] is add.inputs[1]:
            continue
        out_spec = specs.get(add.outputs[0].name)
        if out_spec is None or out_spec.shape is None or not str(out_spec.dtype).startswith(("float", "bfloat")) \
                or "?" in out_spec.shape:
            continue
        for skip_i in (0, 1):
            skip_spec = specs.get(add.inputs[skip_i].name)
            if skip_spec is None or skip_spec.shape is None or tuple(skip_spec.shape) != tuple(out_spec.shape):
                continue
            skip, out = add.inputs[skip_i], add.inputs[1 - skip_i]
            branch = _branch(out, skip, add, outputs)
            if branch:
                blocks.append((_key(add), skip_i, [_key(n) for n in branch]))
                break
    return blocks


def _branch(out: gs.Variable, skip: gs.Variable, add: gs.Node, outputs: set) -> list[gs.Node] | None:
    """The nodes computing ``out`` from ``skip`` and constants only, none read from outside them and ``add``;
    None when ``out`` is not such a branch (or the branch does not read ``skip``)."""
    nodes: dict[int, gs.Node] = {}
    stack, reads_skip = [out], False
    while stack:
        t = stack.pop()
        if t is skip:
            reads_skip = True
            continue
        if isinstance(t, gs.Constant) or t.is_empty():
            continue
        if len(t.inputs) != 1:
            return None  # a graph input or an odd tensor: the branch reads something besides the skip
        n = t.inputs[0]
        if id(n) in nodes:
            continue
        if n.op in ("If", "Loop", "Scan") or any(id(o) in outputs for o in n.outputs):
            return None
        nodes[id(n)] = n
        stack.extend(n.inputs)
    if not nodes or not reads_skip:
        return None
    inside = set(nodes) | {id(add)}
    for n in nodes.values():
        for o in n.outputs:
            if any(id(c) not in inside for c in o.outputs):
                return None
    return list(nodes.values())


def _without(graph: Graph, blocks: list[tuple[str, int, list[str]]]) -> Graph:
    """``graph`` with each block's Add turned into an Identity of its skip input (its branch removed)."""
    ir = IR(graph)
    by_key = {_key(n): n for n in ir.g.nodes}
    for key, skip_i, _ in blocks:
        add = by_key[key]
        add.op = "Identity"
        add.inputs = [add.inputs[skip_i]]
        add.attrs = {}
    ir.g.cleanup()
    return ir.to_graph()


def _distance(ref: list, out: list) -> float:
    """Relative squared error of ``out`` against ``ref`` summed over outputs (infinite when a shape differs)."""
    total = 0.0
    for r, o in zip(ref, out):
        r, o = np.asarray(r, np.float64), np.asarray(o, np.float64)
        if r.shape != o.shape:
            return float("inf")
        total += float(np.sum((o - r) ** 2) / max(np.sum(r ** 2), 1e-30))
    return total


def drop_layers(p, graph: Graph, ctx: PassContext) -> Graph:
    """Run ``p`` (:class:`passes.distill.Distill` with ``method=drop-layers``) on ``graph``."""
    o = p.opts
    where = f"{graph.source or 'model'}: distill(method=drop-layers)"
    graph = unit_gemm_beta(graph)  # a refit bias then acts as written
    blocks = residual_blocks(IR(graph).g, graph.infer_shapes().value_specs())
    if not blocks:
        raise ModelError(f"{where}: the model has no residual block (an Add of x and a branch computed from x "
                         "alone) to remove; nothing was written")
    if o.count > len(blocks):
        raise OptionError(f"pass 'distill': count={o.count} is more than the {len(blocks)} residual block(s) the "
                          "model has: use a smaller count")
    feeds = ctx.calibration(graph, f"pass '{p}'")
    ref = run_reference(graph, feeds)

    def moved(g: Graph) -> float:
        return sum(_distance(r, o) for r, o in zip(ref, run_reference(g, feeds))) / len(feeds)

    def cost(chosen: list) -> float:
        try:
            return moved(_without(graph, chosen))
        except GraphoptError:  # the model without these blocks does not run: never chosen
            return float("inf")

    chosen: list = []
    cumulative = {}
    if len(blocks) * o.count <= GREEDY_RUNS:
        for _ in range(o.count):
            left = [b for b in blocks if b not in chosen]
            costs = [cost(chosen + [b]) for b in left]
            best = int(np.argmin(costs))  # ties: the earlier block
            if not np.isfinite(costs[best]):
                break
            chosen.append(left[best])
            cumulative[left[best][0]] = costs[best]
    else:
        costs = [cost([b]) for b in blocks]
        for i in [i for i in np.argsort(costs, kind="stable") if np.isfinite(costs[i])][:o.count]:
            chosen.append(blocks[int(i)])
            cumulative[blocks[int(i)][0]] = costs[int(i)]
    if len(chosen) < o.count:
        raise ModelError(f"{where}: only {len(chosen)} of the {len(blocks)} residual block(s) can be removed with "
                         f"the model still running (count={o.count}); use a smaller count; nothing was written")
    chosen.sort(key=blocks.index)
    dropped = _without(graph, chosen)
    before_err = cost(chosen)
    result, refit = _refit_followers(graph, dropped, chosen, ctx, feeds)
    after_err = moved(result) if refit else before_err
    if after_err > before_err:  # each layer's least squares need not help the outputs: keep what does
        result, refit, after_err = dropped, [], before_err

    p.note("method", "drop-layers")
    p.note("blocks", len(blocks))
    # output_error: the model's relative output error with this block and those chosen before it removed
    p.note("dropped", {k: {"nodes": len(nodes), "output_error": round(float(np.sqrt(cumulative.get(k, 0.0))), 6)}
                       for k, _, nodes in chosen})
    p.note("refit", refit)
    p.note("output_error", {"dropped": round(float(np.sqrt(before_err)), 6),
                            "refit": round(float(np.sqrt(after_err)), 6)})
    gone = len({n for _, _, nodes in chosen for n in nodes})  # a block inside another counts once
    p.note("summary", f"{len(chosen)} of {len(blocks)} residual block(s) removed ({gone} nodes); "
                      f"{len(refit)} following layer(s) refit; relative output error on the calibration data "
                      f"{np.sqrt(before_err):.3g} -> {np.sqrt(after_err):.3g} after the refit")
    return result


def _followers(g: gs.Graph, starts: list[gs.Tensor], keys: set[str]) -> list[str]:
    """Keys of the layers (in ``keys``) first reached walking forward from ``starts``."""
    found, seen, stack = [], set(), list(starts)
    while stack:
        t = stack.pop()
        for n in t.outputs:
            k = _key(n)
            if k in seen:
                continue
            seen.add(k)
            if k in keys and n.inputs and n.inputs[0] is t:
                found.append(k)
                continue
            stack.extend(n.outputs)
    return found


def _refit_followers(graph: Graph, dropped: Graph, chosen: list, ctx: PassContext, feeds: list) -> tuple:
    """``dropped`` with the layers right after the removed blocks refit to their original outputs, one at a
    time in graph order (each sees the inputs the refits before it produce)."""
    layers_new, _ = Quantize(mode="dynamic")._layers(dropped)
    by_key = {la.key: la for la in layers_new}
    ir = IR(dropped)
    nodes = {_key(n): n for n in ir.g.nodes}
    order = {k: i for i, k in enumerate(nodes)}
    starts = [nodes[k].outputs[0] for k, _, _ in chosen if k in nodes]
    keys = sorted((k for k in set(_followers(ir.g, starts, set(by_key))) if by_key[k].layout != "act"
                   and int(by_key[k].attrs.get("group", 1)) == 1), key=order.__getitem__)
    current, done = dropped, []
    for k in keys:
        refit = _refit_one(graph, current, by_key[k], ctx, feeds)
        if refit is not None:
            current = refit
            done.append(k)
    return current, done


def _refit_one(graph: Graph, current: Graph, la: Layer, ctx: PassContext, feeds: list) -> Graph | None:
    """``current`` with layer ``la`` refit so that, on its inputs in ``current``, it reproduces its output in
    ``graph`` (least squares, bias included when it has one); None when the system cannot be solved."""
    from graphopt.activations import Activations

    rng = np.random.default_rng(ctx.seed)
    hh = ho = sn = so = 0.0
    n = 0
    for new_vals, old_vals in zip(Activations(current, feeds).stream([la.act]),
                                  Activations(graph, feeds).stream([la.act])):
        xn = _input_rows(la, new_vals[la.act].astype(np.float64), slice(None))
        xo = _input_rows(la, old_vals[la.act].astype(np.float64), slice(None))
        if xn.shape[0] > HESSIAN_ROWS:
            pick = np.sort(rng.choice(xn.shape[0], HESSIAN_ROWS, replace=False))
            xn, xo = xn[pick], xo[pick]
        hh, ho = hh + xn.T @ xn, ho + xn.T @ xo
        sn, so = sn + xn.sum(axis=0), so + xo.sum(axis=0)
        n += xn.shape[0]
    if not isinstance(hh, np.ndarray):
        return None
    ir = IR(current)
    node = next(nd for nd in ir.g.nodes if _key(nd) == la.key)
    w = la.w2.astype(np.float64)
    n_in = w.shape[1]
    if la.bias is not None:  # augmented with a ones column: [X 1]
        b = array(_constant(node.inputs[2])).astype(np.float64)
        a_hh = np.block([[hh, sn[:, None]], [sn[None, :], np.array([[n]])]])
        a_ho = np.block([[ho, sn[:, None]], [so[None, :], np.array([[n]])]])
        wa = np.concatenate([w, b[:, None]], axis=1)
    else:
        a_hh, a_ho, wa = hh, ho, w
    lhs = a_hh + DAMP * max(float(np.mean(np.diag(a_hh))), 1e-12) * np.eye(a_hh.shape[0])
    try:
        new = np.linalg.solve(lhs, a_ho @ wa.T).T
    except np.linalg.LinAlgError:
        return None
    if not np.isfinite(new).all():
        return None
    w_new = new[:, :n_in]
    stored = w_new.reshape(la.w.shape) if la.layout == "rows" else w_new.T
    _constant(node.inputs[1]).values = np.ascontiguousarray(stored, dtype=np.float32)
    if la.bias is not None:
        _constant(node.inputs[2]).values = np.ascontiguousarray(new[:, n_in], dtype=np.float32)
    return ir.to_graph()
