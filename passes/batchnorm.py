"""fold-batchnorm: fold inference-mode BatchNormalization into the Conv or Gemm before it."""

from __future__ import annotations

import logging

import numpy as np
from onnx import numpy_helper

from graphopt.graph import Graph
from graphopt.passbase import Pass, PassContext

from ._walk import consumers, node_label, replace_all

log = logging.getLogger("graphopt.passes.batchnorm")


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == a.FLOAT else a.i
    return default


class FoldBatchNorm(Pass):
    """Fold BatchNormalization (inference mode) into a preceding Conv or Gemm.

    ``y = (x*W + b - mean) * gamma / sqrt(var + eps) + beta`` becomes one Conv
    or Gemm with scaled weights and a new bias. Folded only when the Conv/Gemm
    output feeds nothing but the BN, weights and BN statistics are constant,
    and the BN is not in training mode; every BN left unfolded is listed in
    the record with the reason.
    """

    name = "fold-batchnorm"
    lossless = True

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        gp = graph.graph
        inits = {t.name: t for t in gp.initializer}
        readers = consumers(gp)
        producers = {o: n for n in gp.node for o in n.output}
        outputs = {o.name for o in gp.output}
        remove = []
        skipped = {}
        new_inits = {}
        for idx, bn in enumerate(gp.node):
            if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
                continue
            label = bn.name or bn.output[0]
            why = self._why_not(bn, producers, readers, inits, outputs)
            if why:
                skipped[label] = why
                continue
            prev = producers[bn.input[0]]
            gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
            scale = gamma / np.sqrt(var + _attr(bn, "epsilon", 1e-5))
            w_t = inits[prev.input[1]]
            w = numpy_helper.to_array(w_t)
            if prev.op_type == "Conv":
                out_ch = w.shape[0]
                w_new = w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            else:  # Gemm: y = alpha*A*B(^T) + beta*C, output channels are B's columns (rows if transB)
                trans_b = _attr(prev, "transB", 0)
                alpha = _attr(prev, "alpha", 1.0)
                out_ch = w.shape[0] if trans_b else w.shape[1]
                w_new = w.astype(np.float64) * alpha * (scale[:, None] if trans_b else scale[None, :])
            bias_name = prev.input[2] if len(prev.input) > 2 and prev.input[2] else None
            if bias_name:
                b = numpy_helper.to_array(inits[bias_name]).astype(np.float64)
                if prev.op_type == "Gemm":
                    b = b * _attr(prev, "beta", 1.0)
                b = np.broadcast_to(b, (out_ch,))
            else:
                b = np.zeros(out_ch)
            b_new = (b - mean) * scale + numpy_helper.to_array(inits[bn.input[2]]).astype(np.float64)
            wname, bname = f"{w_t.name}_bnfold_{label}", f"{label}_bnfold_bias"
            new_inits[wname] = numpy_helper.from_array(w_new.astype(w.dtype), wname)
            new_inits[bname] = numpy_helper.from_array(b_new.astype(w.dtype), bname)
            prev.input[1] = wname
            if len(prev.input) > 2:
                prev.input[2] = bname
            else:
                prev.input.append(bname)
            if prev.op_type == "Gemm":
                for a in prev.attribute:
                    if a.name in ("alpha", "beta"):
                        a.f = 1.0
            prev.output[0] = bn.output[0]
            remove.append(idx)
            log.debug("fold-batchnorm: folded %s into %s", node_label(bn), node_label(prev))
        replace_all(gp.node, [n for i, n in enumerate(gp.node) if i not in set(remove)])
        gp.initializer.extend(new_inits.values())
        used = {i for n in gp.node for i in n.input} | outputs
        replace_all(gp.initializer, [t for t in gp.initializer if t.name in used])
        self.note("folded", len(remove))
        if skipped:
            self.note("not_folded", skipped)
        return graph

    @staticmethod
    def _why_not(bn, producers, readers, inits, outputs) -> str | None:
        if len(bn.output) > 1 and any(bn.output[1:]):
            return "training mode (running statistics are outputs)"
        if _attr(bn, "training_mode", 0):
            return "training_mode=1"
        if not all(n in inits for n in bn.input[1:5]):
            return "scale/bias/mean/var are not constants"
        prev = producers.get(bn.input[0])
        if prev is None or prev.op_type not in ("Conv", "Gemm") or prev.domain not in ("", "ai.onnx"):
            return f"input comes from {prev.op_type if prev is not None else 'a graph input'}, not Conv/Gemm"
        if len(readers.get(bn.input[0], [])) != 1 or bn.input[0] in outputs:
            return f"the {prev.op_type} output has other readers"
        if len(prev.input) < 2 or prev.input[1] not in inits:
            return f"the {prev.op_type} weight is not a constant"
        if len(prev.input) > 2 and prev.input[2] and prev.input[2] not in inits:
            return f"the {prev.op_type} bias is not a constant"
        if prev.op_type == "Gemm":
            w = inits[prev.input[1]]
            if len(w.dims) != 2:
                return "Gemm weight is not 2-D"
            if len(prev.input) > 2 and prev.input[2]:
                c = inits[prev.input[2]]
                n_out = w.dims[0] if _attr(prev, "transB", 0) else w.dims[1]
                if int(np.prod(c.dims)) not in (1, n_out):
                    return "Gemm bias does not broadcast per output channel"
        return None
