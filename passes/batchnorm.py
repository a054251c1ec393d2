"""fold-batchnorm: fold inference-mode BatchNormalization into the Conv or Gemm before it."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import GraphSurgeonPass, all_graphs, array, detach, drop_nodes, graph_outputs_of, is_loaded, label

log = logging.getLogger("graphopt.passes.batchnorm")


class FoldBatchNorm(GraphSurgeonPass):
    """Fold BatchNormalization (inference mode) into a preceding Conv or Gemm.

    ``y = (x*W + b - mean) * gamma / sqrt(var + eps) + beta`` becomes one Conv
    or Gemm with scaled weights and a new bias, in the main graph and in every
    subgraph. Folded only when the Conv/Gemm output feeds nothing but the BN
    (readers inside subgraphs count) and is no graph output, weights and BN
    statistics are constants, and the BN is not in training mode; every BN left
    unfolded is listed in the record with the reason. Leaves alone: the
    original weights when something else still reads them, any initializer a
    subgraph reads; the result is topologically sorted.
    """

    name = "fold-batchnorm"
    lossless = True

    def rewrite(self, ir, ctx) -> None:
        out_index = graph_outputs_of(ir.g)
        folded = 0
        skipped: dict[str, str] = {}
        for g in list(all_graphs(ir.g)):
            dead = []
            for bn in g.nodes:
                if bn.op != "BatchNormalization" or (bn.domain or "") not in ("", "ai.onnx"):
                    continue
                name = bn.name or bn.outputs[0].name
                why = self._why_not(bn, out_index)
                if why:
                    skipped[name] = why
                    continue
                self._fold(bn, name)
                dead.append(bn)
                log.debug("fold-batchnorm: folded %s", label(bn))
            folded += drop_nodes(g, dead)
        self.note("folded", folded)
        if skipped:
            self.note("not_folded", skipped)

    @staticmethod
    def _fold(bn: gs.Node, name: str) -> None:
        prev = bn.inputs[0].inputs[0]
        gamma, beta, mean, var = (array(t).astype(np.float64) for t in bn.inputs[1:5])
        scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        w_t = prev.inputs[1]
        w = array(w_t)
        if prev.op == "Conv":
            out_ch = w.shape[0]
            w_new = w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        else:  # Gemm: y = alpha*A*B(^T) + beta*C; output channels are B's columns (rows if transB)
            trans_b = int(prev.attrs.get("transB", 0))
            alpha = float(prev.attrs.get("alpha", 1.0))
            out_ch = w.shape[0] if trans_b else w.shape[1]
            w_new = w.astype(np.float64) * alpha * (scale[:, None] if trans_b else scale[None, :])
        has_bias = len(prev.inputs) > 2 and not prev.inputs[2].is_empty()
        if has_bias:
            b = array(prev.inputs[2]).astype(np.float64)
            if prev.op == "Gemm":
                b = b * float(prev.attrs.get("beta", 1.0))
            b = np.broadcast_to(b, (out_ch,))
        else:
            b = np.zeros(out_ch)
        b_new = (b - mean) * scale + beta
        new_w = gs.Constant(f"{w_t.name}_bnfold_{name}", w_new.astype(w.dtype))
        new_b = gs.Constant(f"{name}_bnfold_bias", b_new.astype(w.dtype))
        prev.inputs[1] = new_w
        if len(prev.inputs) > 2:
            prev.inputs[2] = new_b
        else:
            prev.inputs.append(new_b)
        if prev.op == "Gemm":
            prev.attrs["alpha"] = 1.0
            if "beta" in prev.attrs:
                prev.attrs["beta"] = 1.0
        # The Conv/Gemm now writes the BN's output (its name may be a graph output).
        out = bn.outputs[0]
        old = bn.inputs[0]
        detach(bn)
        prev.outputs[0] = out
        del old

    @staticmethod
    def _why_not(bn: gs.Node, out_index: dict) -> str | None:
        if len(bn.outputs) > 1 and any(not t.is_empty() for t in bn.outputs[1:]):
            return "training mode (running statistics are outputs)"
        if int(bn.attrs.get("training_mode", 0)):
            return "training_mode=1"
        if len(bn.inputs) < 5 or not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
            return "scale/bias/mean/var are not constants"
        if not all(is_loaded(t) for t in bn.inputs[1:5]):
            return "scale/bias/mean/var are external data that is not loaded"
        x = bn.inputs[0]
        prev = x.inputs[0] if isinstance(x, gs.Variable) and len(x.inputs) == 1 else None
        if prev is None or prev.op not in ("Conv", "Gemm") or (prev.domain or "") not in ("", "ai.onnx"):
            return f"input comes from {prev.op if prev is not None else 'a graph input'}, not Conv/Gemm"
        if len(x.outputs) != 1 or id(x) in out_index:
            return f"the {prev.op} output has other readers"
        if len(prev.inputs) < 2 or not isinstance(prev.inputs[1], gs.Constant):
            return f"the {prev.op} weight is not a constant"
        if len(prev.inputs) > 2 and not prev.inputs[2].is_empty() and not isinstance(prev.inputs[2], gs.Constant):
            return f"the {prev.op} bias is not a constant"
        if not all(is_loaded(t) for t in prev.inputs[1:3] if not t.is_empty()):
            return f"the {prev.op} weights are external data that is not loaded"
        if prev.op == "Gemm":
            w = prev.inputs[1]
            if len(w.shape) != 2:
                return "Gemm weight is not 2-D"
            if len(prev.inputs) > 2 and not prev.inputs[2].is_empty():
                n_out = w.shape[0] if int(prev.attrs.get("transB", 0)) else w.shape[1]
                if int(np.prod(prev.inputs[2].shape)) not in (1, n_out):
                    return "Gemm bias does not broadcast per output channel"
        return None
