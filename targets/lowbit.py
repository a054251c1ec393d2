"""Low-bit weights compiled as low-bit weights: the decode of ``quantize(mode=weight-only)`` fused into the GEMM.

``quantize(mode=weight-only,bits=B,group=G)`` writes each weight as packed
codes (bit-planes, or plain bytes at 8 bits) with a float16 scale and offset
per output channel and group, and a chain of ~15 ONNX ops that decodes them
back into the float weight before its MatMul / Gemm. Compiled as it stands,
that chain is either folded into float constants (the artifact holds the
float weights again) or run on every call. The CPU target instead:

1. finds every MatMul / Gemm whose weight is such a decode (:func:`find_decodes`):
   the weight's constant cone reads one uint8 tensor of codes and two float16
   ``[N, groups, 1]`` tensors (float32 holding float16 values where a clean-up
   folded their Cast), and *evaluating the cone with ONNX Runtime
   gives exactly* ``code * scale + offset`` for one reading of those tensors
   (bit-planes of ``B`` bits or bytes; which is the scale). The check is
   numerical, so a graph that merely looks like the quantizer's output is left
   alone, and any producer that writes the same decode is taken;
2. replaces the node (:func:`fuse_decodes`, on a copy of the graph handed to
   TVM's importer; the artifact's ``model.onnx`` keeps the decode, so the
   reference still verifies) by ``ai.graphopt.LowBitMatMul(x, codes, scales,
   offsets)``;
3. imports that node (:func:`converters`) as two weight transforms, which the
   prepack step runs once at lower time (the codes into the kernel's layout:
   per block of 32 output columns and per input, 32 codes in a 2-, 4- or
   8-bit container; the scales and offsets per block), and one call of
   ``lowbit.c``, which decodes a panel of weights into L1 and runs a float32
   GEMM over it (AVX-512, else portable C for AVX2 + FMA or any CPU).

The artifact stores the codes and the repacked codes (both low-bit: no float
copy of the weight anywhere) and the result differs from ONNX Runtime's
decode-then-MatMul by float summation order only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("lowbit.c")
SYMBOL = "graphopt_lowbit_gemm_f32_{variant}"
DOMAIN = "ai.graphopt"
OP = "LowBitMatMul"
#: Output columns per packed block (two AVX-512 vectors).
BLOCK = 32
#: Rows of the activation per parallel task: the panel decoded for a block is reused over these rows.
TASK_ROWS = 64
#: Decoded float32 weights evaluated together (in one ONNX Runtime session) to check their decodes: a large
#: model's weights are checked a batch at a time, never all decoded at once; a single weight past this is
#: not fused.
MAX_CONE_BYTES = 1 << 28


def variant(features) -> str:
    """The kernel variant for a CPU with LLVM ``features``: ``avx512``, ``avx2`` (with FMA) or ``generic``."""
    f = set(features)
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "f16c", "fma"} <= f:
        return "avx512"
    if {"avx2", "fma"} <= f:
        return "avx2"
    return "generic"


def kernel_object(scratch: Path) -> Path:
    """``lowbit.c`` compiled into ``scratch``; ``-ffp-contract=off`` keeps the decode's multiply and add two
    roundings, as in the graph (the GEMM's fused multiply-adds are written explicitly)."""
    from .cc import compile_object

    return compile_object(SOURCE, scratch, flags=("-ffp-contract=off",))


def container_bits(bits: int) -> int:
    """Bits per code in the kernel's layout: 8, 4 (for 3- and 4-bit codes) or 2."""
    return 8 if bits > 4 else 4 if bits > 2 else 2


@dataclass(frozen=True)
class Decode:
    """One MatMul / Gemm whose weight is a low-bit decode (see the module docstring)."""

    node: str  #: the consumer's node name (unique after :func:`named`)
    codes: str  #: uint8 initializer: bit-planes [ceil(n*cols/8), bits], or bytes [n, cols] (bits = 8)
    scales: str  #: float16 (or float32 holding float16 values) initializer [n, groups, 1]
    offsets: str  #: the same
    bits: int
    k: int  #: inputs of the matmul (the weight's reduced dim)
    n: int  #: outputs
    cols: int  #: codes per output channel as stored (k rounded up to whole groups)
    group: int  #: inputs per group (cols when one group)


# ------------------------------------------------------------------------------------------- recognition
def _initializers(g) -> dict:
    return {t.name: t for t in g.initializer}


def _cone(name: str, producers: dict, inits: dict):
    """(nodes, initializer leaves) computing ``name`` from constants only; None otherwise."""
    import onnx

    nodes, leaves, seen, stack = {}, set(), set(), [name]
    while stack:
        v = stack.pop()
        if v in seen or v == "":
            continue
        seen.add(v)
        if v in inits:
            leaves.add(v)
            continue
        node = producers.get(v)
        if node is None or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                               for a in node.attribute):  # a graph input; or a subgraph
            return None
        if node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"):
            return None
        nodes[id(node)] = node
        stack.extend(node.input)
    return list(nodes.values()), leaves


def _hypotheses(packed: np.ndarray, s: np.ndarray, k: int):
    """Readings ``(bits, cols, group, codes [n, cols])`` of ``packed`` for a weight with ``k`` inputs, scale [n, ng, 1]."""
    from graphopt.passes._quant_math import unpack_bitplanes

    n, ng = s.shape[0], s.shape[1]
    if packed.ndim == 2 and packed.shape[0] == n and packed.shape[1] >= k and packed.shape[1] % ng == 0:
        cols = packed.shape[1]
        yield 8, cols, cols // ng, packed
    if packed.ndim == 2 and 1 <= packed.shape[1] <= 7:
        bits, nb = packed.shape[1], packed.shape[0]
        lo = -(-k // ng)
        # One group may be wider than k (cols padded up to the group size): as wide as the codes allow.
        hi = k // (ng - 1) if ng > 1 else max(k, (nb * 8) // max(n, 1))
        for group in range(lo, hi + 1):
            cols = group * ng
            if -(-k // group) != ng or cols < k or -(-(n * cols) // 8) != nb:
                continue
            yield bits, cols, group, unpack_bitplanes(packed, n * cols).reshape(n, cols)


def _decoded(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, group: int, k: int) -> np.ndarray:
    """``codes * scale + offset`` in float32 as the graph computes it, [n, k]."""
    n, cols = codes.shape
    ng = scale.shape[1]
    f = codes.astype(np.float32).reshape(n, ng, cols // ng)
    # The kernel reads the grids as float16: a float32 grid must hold float16 values for the reading to match.
    s16, o16 = (np.asarray(t).astype(np.float16).astype(np.float32) for t in (scale, offset))
    w = f * s16.reshape(n, ng, 1) + o16.reshape(n, ng, 1)
    return w.reshape(n, cols)[:, :k]


def _matches(w_true: np.ndarray, w_hyp: np.ndarray) -> bool:
    # The decode is exact float32 arithmetic (a cast, a multiply, an add): equal up to a last-bit difference
    # where an evaluator fuses the multiply and add.
    if w_true.shape != w_hyp.shape:
        return False
    return bool(np.allclose(w_true, w_hyp, rtol=1e-6, atol=1e-30))


def _candidates(graph):
    """``(node, weight name, weight layout 'kn' or 'nk', cone)`` for each MatMul / Gemm with a constant-cone weight."""
    g = graph.graph
    inits = _initializers(g)
    producers = {o: n for n in g.node for o in n.output}
    for node in g.node:
        if node.op_type == "MatMul" and len(node.input) == 2:
            layout = "kn"
        elif node.op_type == "Gemm" and len(node.input) >= 2:
            attrs = {a.name: a for a in node.attribute}
            if (attrs.get("transA") and attrs["transA"].i) or (attrs.get("alpha") and attrs["alpha"].f != 1.0):
                continue
            if len(node.input) == 3 and node.input[2] and attrs.get("beta") and attrs["beta"].f != 1.0:
                continue
            layout = "nk" if attrs.get("transB") and attrs["transB"].i else "kn"
        else:
            continue
        w = node.input[1]
        if w in inits:
            continue
        cone = _cone(w, producers, inits)
        if cone is None or not cone[0]:
            continue
        yield node, w, layout, cone


def _structure(cone_leaves, inits):
    """``(codes, [grid, grid])`` when a constant cone's leaves look like a weight-only decode: one uint8
    tensor and exactly two float16 or float32 tensors of one shape ``[N, groups, 1]`` (float32 where a
    clean-up folded the graph's Cast of the float16 grids), else None."""
    import onnx

    u8 = [x for x in cone_leaves if inits[x].data_type == onnx.TensorProto.UINT8]
    grids: dict[tuple, list] = {}
    for x in cone_leaves:
        t = inits[x]
        if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT) and len(t.dims) == 3 and t.dims[2] == 1:
            grids.setdefault((t.data_type, *t.dims), []).append(x)
    pairs = [sorted(v) for v in grids.values() if len(v) == 2]
    if len(u8) != 1 or len(pairs) != 1:
        return None
    return u8[0], pairs[0]


def decoded_weight_bytes(graph) -> int:
    """Float32 bytes of the Conv / Gemm / MatMul weights the main graph computes from initializers and
    reshapes to a constant shape: weights stored in another form and decoded in the graph (``prune``'s sparse
    values and mask, any plugin's codebook). The CPU target allows that growth when it lifts the decode to
    lower time, so the decoded weight is stored packed for its kernel instead of decoded on every run."""
    g = graph.graph
    inits = _initializers(g)
    producers = {o: n for n in g.node for o in n.output}
    total, seen = 0, set()
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = node.input[1]
        if w in seen or w in inits or w not in producers:
            continue
        seen.add(w)
        last = producers[w]
        if last.op_type != "Reshape" or len(last.input) < 2 or last.input[1] not in inits:
            continue
        if _cone(w, producers, inits) is None:
            continue
        from onnx import numpy_helper

        shape = numpy_helper.to_array(inits[last.input[1]]).reshape(-1)
        if shape.size and (shape > 0).all():
            total += 4 * int(np.prod(shape, dtype=np.int64))
    return total


def decode_codes(graph) -> dict[str, int]:
    """``{codes initializer: decoded float32 bytes}`` for every constant input of a main-graph node that
    looks like a weight-only decode (see :func:`_structure`; structure only, not checked numerically),
    whatever reads it (a Conv too).

    The CPU target makes these codes weights, so a decode that is not fused (:func:`find_decodes`) is a
    weight transform run once at lower time (the float weight stored, laid out for its kernel) instead of
    a constant folded into ``main.so``, where its consumer gets no prepacked layout (measured ad hoc: a
    64-channel 3x3 conv pair 2.2x, an MLP 1024-4096-1024 7x slower than the float artifact).
    """
    g = graph.graph
    inits = _initializers(g)
    producers = {o: n for n in g.node for o in n.output}
    out, seen = {}, set()
    for node in g.node:
        for v in node.input:
            if not v or v in inits or v in seen or v not in producers:
                continue
            seen.add(v)
            cone = _cone(v, producers, inits)
            if cone is None or not cone[0]:
                continue
            found = _structure(cone[1], inits)
            if found is None:
                continue
            codes = inits[found[0]]
            n_codes = int(np.prod(codes.dims, dtype=np.int64))
            # Bit-planes [ceil(count/8), bits] hold 8 codes per row; bytes [n, cols] one code each.
            count = 8 * int(codes.dims[0]) if len(codes.dims) == 2 and 1 <= codes.dims[1] <= 7 else n_codes
            out[found[0]] = out.get(found[0], 0) + 4 * count
    return out


def find_decodes(graph) -> list[Decode]:
    """The MatMul / Gemm nodes of ``graph``'s main graph whose weight is a low-bit decode (module docstring).

    Node names must be unique and non-empty (:func:`named` makes them so).
    """
    g = graph.graph
    inits = _initializers(g)
    found = []
    plans = []
    for node, w, layout, (nodes, leaves) in _candidates(graph):
        leaf_roles = _structure(leaves, inits)
        if leaf_roles is None:
            continue
        u8, f16 = [leaf_roles[0]], leaf_roles[1]
        # The decode's largest float32 value: 4 bytes per code, and bit-planes hold 8 codes per row of bytes.
        dims = list(inits[u8[0]].dims)
        codes = 8 * dims[0] if len(dims) == 2 and 1 <= dims[1] <= 7 else int(np.prod(dims, dtype=np.int64))
        cost = 4 * codes
        if cost > MAX_CONE_BYTES:
            continue
        plans.append((node, w, layout, nodes, leaves, u8[0], f16, cost))
    if not plans:
        return []
    # Checked a batch at a time; a batch's decoded weights are dropped before the next is evaluated.
    for batch in _batches(plans):
        values = _evaluate(graph, [p[3] for p in batch], [p[4] for p in batch], [p[1] for p in batch])
        for node, w, layout, nodes, leaves, u8, f16, _ in batch:
            hit = _match(node, values.get(w), layout, inits, u8, f16)
            if hit:
                found.append(hit)
        del values
    return found


def _match(node, wt, layout: str, inits: dict, u8: str, f16: list) -> Decode | None:
    """The reading of ``u8`` and the grids ``f16`` that reproduces the evaluated weight ``wt``, if any."""
    from graphopt.graph import tensor_array

    if wt is None or wt.dtype != np.float32 or wt.ndim != 2:
        return None
    w_nk = wt if layout == "nk" else wt.T
    n, k = w_nk.shape
    packed = np.asarray(tensor_array(inits[u8]))
    a, b = (np.asarray(tensor_array(inits[x])) for x in f16)
    if a.shape[0] != n:
        return None
    for bits, cols, group, codes in _hypotheses(packed, a, k):
        for s_name, o_name, s, o in ((f16[0], f16[1], a, b), (f16[1], f16[0], b, a)):
            if _matches(w_nk, _decoded(codes, s, o, group, k)):
                return Decode(node.name, u8, s_name, o_name, bits, k, n, cols, group)
    return None


def _batches(plans):
    """``plans`` in runs whose decoded weights total at most MAX_CONE_BYTES (a large model's weights are
    never all decoded at once)."""
    batch, size = [], 0
    for p in plans:
        b = p[-1]
        if batch and size + b > MAX_CONE_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += b
    if batch:
        yield batch


def _evaluate(graph, cones, leaf_sets, outs) -> dict:
    """The values ``outs`` of ``graph``'s constant ``cones`` (node lists), evaluated together in one ONNX
    Runtime session without graph optimizations; {} where that fails (an external-data weight, an op ONNX
    Runtime lacks...: nothing of this batch is fused)."""
    import onnx
    from onnx import helper

    g = graph.graph
    inits = _initializers(g)
    wanted = {id(n) for nodes in cones for n in nodes}
    ordered = [n for n in g.node if id(n) in wanted]
    leaves = sorted(set().union(*leaf_sets))
    outs = sorted(set(outs))
    from graphopt.graph import is_lazy, tensor_array

    # A lazy tensor (a large model's weight left on disk) goes in inline: the batch bounds what that loads.
    sub = helper.make_graph(ordered, "cones", [], [onnx.ValueInfoProto(name=o) for o in outs],
                            [onnx.numpy_helper.from_array(np.asarray(tensor_array(inits[x])), x) if is_lazy(inits[x])
                             else inits[x] for x in leaves])
    model = helper.make_model(sub, opset_imports=list(graph.model.opset_import), ir_version=graph.model.ir_version)
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return dict(zip(outs, sess.run(outs, {})))
    except Exception:  # noqa: BLE001 - any failure only means: not recognized
        return {}


def named(graph):
    """``graph`` as a copy whose main-graph nodes have unique names: an unnamed node, or one whose name an
    earlier node took, gets a fresh one (the same on every call: positions decide)."""
    g = graph.copy()
    taken = {n.name for n in g.graph.node if n.name}
    seen: set = set()
    for i, node in enumerate(g.graph.node):
        if not node.name or node.name in seen:
            name, j = f"graphopt_node_{i}", 0
            while name in taken:
                j += 1
                name = f"graphopt_node_{i}_{j}"
            node.name = name
            taken.add(name)
        seen.add(node.name)
    return g


def _subgraph_reads(nodes) -> set:
    """Every value read inside the subgraphs (If / Loop / Scan bodies, at any depth) of ``nodes``."""
    import onnx

    out = set()
    for n in nodes:
        for a in n.attribute:
            bodies = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) \
                if a.type == onnx.AttributeProto.GRAPHS else []
            for body in bodies:
                out |= {i for sn in body.node for i in sn.input} | {o.name for o in body.output}
                out |= _subgraph_reads(body.node)
    return out


def fuse_decodes(graph, decodes: list[Decode]):
    """A copy of ``graph`` where each decode's consumer is an ``ai.graphopt.LowBitMatMul`` and the decode
    nodes nothing else reads are gone (see the module docstring)."""
    from onnx import helper

    g = graph.copy()
    by_name = {d.node: d for d in decodes}
    nodes = list(g.graph.node)
    new_nodes = []
    for node in nodes:
        d = by_name.get(node.name)
        if d is None:
            new_nodes.append(node)
            continue
        y = node.output[0]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) == 3 and node.input[2] else None
        out = f"{y}__lowbit" if bias else y
        new_nodes.append(helper.make_node(OP, [node.input[0], d.codes, d.scales, d.offsets], [out], name=node.name,
                                          domain=DOMAIN, bits=d.bits, k=d.k, n=d.n, cols=d.cols, group=d.group))
        if bias:
            new_nodes.append(helper.make_node("Add", [out, bias], [y], name=f"{node.name}__bias"))
    # Drop nodes whose outputs nothing reads any more (the decode chains), to a fixed point.
    keep = list(new_nodes)
    graph_outputs = {o.name for o in g.graph.output}
    while True:
        used = {i for n in keep for i in n.input} | graph_outputs | _subgraph_reads(keep)
        live = [n for n in keep if any(o in used for o in n.output)]
        if len(live) == len(keep):
            break
        keep = live
    del g.graph.node[:]
    g.graph.node.extend(keep)
    if not any(o.domain == DOMAIN for o in g.model.opset_import):
        g.model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return g


# ------------------------------------------------------------------------------------------- lowering
def _gemm_primfunc(symbol: str, k: int, n: int, nb: int, cb: int, ng: int, group: int):
    """TIR ``(x [m, k] f32, codes [nb, k, 4*cb] u8, scales [nb, ng, 32] f16, offsets) -> y [m, n] f32``:
    one call of ``lowbit.c`` per (row task, column block), in parallel."""
    from tvm.script import parser

    T = __import__("tvm.script.tirx", fromlist=["tirx"])
    rt = TASK_ROWS
    src = f'''
@T.prim_func(private=True)
def lowbit_gemm(x: T.handle, codes: T.Buffer(({nb}, {k}, {4 * cb}), "uint8"),
                s: T.Buffer(({nb}, {ng}, {BLOCK}), "float16"), o: T.Buffer(({nb}, {ng}, {BLOCK}), "float16"),
                y: T.handle):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    m = T.int64()
    X = T.match_buffer(x, (m, {k}), "float32")
    Y = T.match_buffer(y, (m, {n}), "float32")
    for t in T.parallel(((m + {rt - 1}) // {rt}) * {nb}):
        T.evaluate(T.call_extern("int32", "{symbol}", X.data, codes.data, s.data, o.data, Y.data, m,
            T.int64({k}), T.int64({n}), T.int64({group}), T.int64({ng}), T.int32({cb}),
            (t // {nb}) * {rt}, T.min(m - (t // {nb}) * {rt}, {rt}), t % {nb}, T.int64(1)))
'''
    return parser.parse(src, extra_vars={"T": T})


def _code(packed, bits: int, n: int, cols: int, col, kk):
    """TE expression: the uint8 code of output column ``col`` and input ``kk`` (0 past column n)."""
    from tvm import tirx

    zero = tirx.const(0, "uint8")
    col64 = tirx.Cast("int64", col)
    if bits == 8:
        v = packed[tirx.min(col64, n - 1), kk]
    else:
        idx = tirx.min(col64, n - 1) * cols + tirx.Cast("int64", kk)
        t = tirx.Cast("uint8", idx % 8)
        v = zero
        for p in range(bits):
            v = v | (((packed[idx // 8, p] >> t) & tirx.const(1, "uint8")) << tirx.const(p, "uint8"))
    return tirx.if_then_else(col64 < n, v, zero)


def _repack_codes(packed, bits: int, k: int, n: int, cols: int, nb: int):
    """TE: the codes in the kernel's layout [nb, k, 4*cb] (see lowbit.c)."""
    from tvm import te, tirx

    cb = container_bits(bits)
    zero = tirx.const(0, "uint8")
    per = 32 // (8 // cb)  # codes per container byte lane: 32, 16 or 8 byte positions

    def body(b, kk, j):
        v = zero
        for lane in range(8 // cb):
            v = v | (_code(packed, bits, n, cols, b * BLOCK + j + lane * per, kk) << tirx.const(lane * cb, "uint8"))
        return v

    return te.compute((nb, k, 4 * cb), body, name="lowbit_codes")


def _decode_weight(packed, scales, offsets, bits: int, k: int, n: int, cols: int, group: int):
    """TE: the float32 weight [k, n] the graph's decode computes (``code * scale + offset``), for a
    :data:`OP` whose activation's shape the importer does not know (decoded at lower time instead)."""
    from tvm import te, tirx

    def grid(t, col, g):
        return tirx.Cast("float32", t[col, g, 0])

    def body(kk, col):
        g = kk // group
        return tirx.Cast("float32", _code(packed, bits, n, cols, col, kk)) * grid(scales, col, g) + grid(offsets, col, g)

    return te.compute((k, n), body, name="lowbit_decode")


def _repack_grid(t, n: int, ng: int, nb: int):
    """TE: a float16 [n, ng, 1] scale / offset as [nb, ng, 32], zero past column n."""
    from tvm import te, tirx

    def body(b, g, j):
        col = tirx.Cast("int64", b * BLOCK + j)
        v = t[tirx.min(col, n - 1), g, 0]
        v = v if str(v.dtype) == "float16" else tirx.Cast("float16", v)  # a folded Cast: float16 values in float32
        return tirx.if_then_else(col < n, v, tirx.const(0, "float16"))

    return te.compute((nb, ng, BLOCK), body, name="lowbit_grid")


def _convert(bb, inputs, attr, symbol: str, used: list):
    from tvm import relax

    x, packed, scales, offsets = inputs
    bits, k, n, cols, group = (int(attr[a]) for a in ("bits", "k", "n", "cols", "group"))
    used.append(attr.get("tvm_custom", {}).get("name") or "?")
    shape = getattr(x.ty, "shape", None)
    if getattr(shape, "values", None) is None:
        # The importer does not know x's shape (a dynamic slice, a branch's output): the weight is decoded
        # at lower time (its codes are a weight) and an ordinary matmul takes x as it comes.
        used.pop()
        w = bb.emit_te(_decode_weight, packed, scales, offsets, bits, k, n, cols, group,
                       primfunc_name_hint="lowbit_decode")
        return bb.emit(relax.op.matmul(x, w))
    ng = -(-cols // group)
    nb = -(-n // BLOCK)
    cb = container_bits(bits)
    emit = bb.emit
    codes = bb.emit_te(_repack_codes, packed, bits, k, n, cols, nb, primfunc_name_hint="lowbit_repack_codes")
    s = bb.emit_te(_repack_grid, scales, n, ng, nb, primfunc_name_hint="lowbit_repack_grid")
    o = bb.emit_te(_repack_grid, offsets, n, ng, nb, primfunc_name_hint="lowbit_repack_grid")
    lead = list(x.ty.shape.values[:-1])
    x2 = emit(relax.op.reshape(x, [-1, k]))
    gv = bb.add_func(_gemm_primfunc(symbol, k, n, nb, cb, ng, group), "lowbit_gemm")
    m = x2.ty.shape.values[0]
    y = emit(relax.call_tir(gv, [x2, codes, s, o], relax.TensorType([m, n], "float32")))
    return emit(relax.op.reshape(y, [*lead, n])) if len(lead) != 1 else y


def converters(features, used: list) -> dict:
    """``{"LowBitMatMul": converter}`` for TVM's ONNX importer; converted nodes' names are appended to ``used``."""
    from tvm.relax.frontend.onnx import onnx_frontend

    symbol = SYMBOL.format(variant=variant(features))

    def impl(cls, bb, inputs, attr, params):
        return _convert(bb, inputs, attr, symbol, used)

    return {OP: type("LowBitMatMul", (onnx_frontend.OnnxOpConverter,),
                     {"_impl_v1": classmethod(impl), "__doc__": "graphopt's fused low-bit decode + GEMM."})}


def repacked_bytes(decodes: list[Decode]) -> int:
    """Bytes the repacked codes and grids add to the artifact (the prepack step's growth allowance)."""
    total = 0
    for d in decodes:
        nb = -(-d.n // BLOCK)
        ng = -(-d.cols // d.group)
        total += nb * d.k * 4 * container_bits(d.bits) + 2 * nb * ng * BLOCK * 2
    return total
