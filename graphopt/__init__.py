"""graphopt: a plugin-based, compiler-style optimizer for neural-network graphs.

The public API lives here; everything else is internal.

    import graphopt
    g = graphopt.Graph.load("model.onnx")               # or graphopt.capture(module, (x,))
    res = graphopt.lower(g, "cpu", "build/model", verify=True)
    art = graphopt.load("build/model")
    outputs = art.run({"x": x})
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ArtifactError, DataError, GraphoptError, LoweringError, ModelError, OptionError, OutputError, PluginError,
    UnsupportedOpsError, VerificationError,
)
from .graph import Graph, TensorSpec  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .options import Option  # noqa: E402
from .passbase import Pass, PassContext, PassRecord  # noqa: E402
from .pipeline import Pipeline  # noqa: E402
from .data import DataSource  # noqa: E402
from .target import LowerContext, Target  # noqa: E402
from .stats import graph_stats, inspect_graph  # noqa: E402
from .plugins import get_registry  # noqa: E402
from .manager import PassManager  # noqa: E402
from .artifact import Artifact  # noqa: E402
from .api import DEFAULT_LOWER_PIPELINE, RunResult, load, lower, optimize, verify_artifact  # noqa: E402


def capture(module, example_inputs, **kwargs) -> Graph:
    """Capture a torch.nn.Module into a Graph (see :func:`graphopt.torch_capture.capture`)."""
    from .torch_capture import capture as _capture

    return _capture(module, example_inputs, **kwargs)


def distill(teacher, student, data, labels=None, **kwargs) -> Graph:
    """Train ``student`` on ``teacher``'s outputs and capture it (see :func:`graphopt.kd.distill`)."""
    from .kd import distill as _distill

    return _distill(teacher, student, data, labels, **kwargs)


__all__ = [
    "Artifact", "ArtifactError", "DataError", "DataSource", "DEFAULT_LOWER_PIPELINE", "Graph", "GraphoptError",
    "LowerContext", "LoweringError", "ModelError", "Option", "OptionError", "OutputError", "Pass", "PassContext", "PassManager",
    "PassRecord", "Pipeline", "PluginError", "RunResult", "Target", "TensorSpec", "UnsupportedOpsError",
    "VerificationError", "capture", "distill", "get_registry", "graph_stats", "hookimpl", "inspect_graph", "load",
    "lower", "optimize", "verify_artifact", "__version__",
]
