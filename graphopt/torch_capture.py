"""Capture a ``torch.nn.Module`` into a Graph: torch.export (an FX graph) then the ONNX exporter.

torch is imported here only, so users who bring ONNX files never need it.
The exporter's own progress lines and warnings are kept off the terminal.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

from .errors import GraphoptError
from .graph import Graph

#: Opset 20: opset 23 emits the ONNX Attention op, which TVM's importer mis-handles.
CAPTURE_OPSET = 20


def capture(
    module,
    example_inputs: Sequence,
    *,
    dynamic_batch: bool = False,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = CAPTURE_OPSET,
) -> Graph:
    """Capture ``module`` called on ``example_inputs`` into a Graph.

    With ``dynamic_batch`` the first dim of every input is the symbolic
    ``batch``, so the result (and what is lowered from it) accepts any batch
    size (an example batch of 1 is fine: it is traced as two copies of the
    same rows). The module is put in eval mode; its weights are embedded. Graph
    inputs are named after ``forward``'s parameters (``forward(self, x)``
    gives an input ``x``) unless ``input_names`` is given; ``input0``,
    ``input1``... only where the signature has no name (``*args``).
    """
    try:
        import torch
    except ModuleNotFoundError as e:
        raise GraphoptError("capturing a torch module needs torch: pip install 'graphopt[torch]'") from e
    if not isinstance(module, torch.nn.Module):
        raise GraphoptError(f"capture() expects a torch.nn.Module, got {type(module).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    module = module.eval()
    names = list(input_names) if input_names else _argument_names(module, len(args))
    tlog = logging.getLogger("torch.onnx")
    old = tlog.level
    tlog.setLevel(logging.ERROR)  # "torchvision is not installed" notices
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            dyn = None
            if dynamic_batch:
                batch = torch.export.Dim("batch", min=1, max=1 << 16)
                dyn = tuple({0: batch} for _ in args)
                if all(isinstance(a, torch.Tensor) and a.ndim and a.shape[0] == 1 for a in args):
                    # torch.export specializes a dim whose example size is 1 and then rejects the
                    # dynamic batch; the same rows twice trace the same (eval-mode) computation.
                    args = tuple(torch.cat([a, a]) for a in args)
            try:
                ep = torch.export.export(module, args, dynamic_shapes=dyn)
            except Exception as e:
                raise GraphoptError(f"torch.export could not capture {type(module).__name__}: {_first_line(e)}") from e
            try:
                program = torch.onnx.export(
                    ep, (), dynamo=True, verbose=False, report=False, verify=False,
                    opset_version=opset, optimize=True, external_data=False,
                    input_names=names, output_names=list(output_names) if output_names else None,
                )
            except Exception as e:
                raise GraphoptError(f"ONNX export of {type(module).__name__} failed: {_first_line(e)}") from e
            if dynamic_batch:
                axes = {v.shape[0]: "batch" for v in program.model.graph.inputs if v.shape is not None and len(v.shape)}
                axes = {k: v for k, v in axes.items() if not isinstance(k, int)}
                if axes:
                    program.rename_axes(axes)
            proto = program.model_proto
    finally:
        tlog.setLevel(old)
    graph = Graph(proto, source=f"torch:{type(module).__name__}")
    graph.check(where=graph.source)
    return graph


def _argument_names(module, count: int) -> list[str]:
    """Names of the first ``count`` positional parameters of ``module.forward``."""
    import inspect

    fallback = [f"input{i}" if count > 1 else "input" for i in range(count)]
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return fallback
    positional = [p.name for p in params
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    names = positional[:count] + fallback[len(positional):count]
    return names if len(set(names)) == len(names) else fallback


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
