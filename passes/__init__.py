"""Built-in passes; registered through the ``graphopt`` entry point like any plugin."""

from graphopt.hookspecs import hookimpl


@hookimpl
def graphopt_register_passes():
    from .batchnorm import FoldBatchNorm
    from .cleanup import Cleanup, DedupInitializers, EliminateDead, EliminateIdentity, FoldConstants
    from .control_flow import UnrollLoops
    from .recurrent import LowerRecurrent

    return [Cleanup, FoldConstants, EliminateIdentity, EliminateDead, DedupInitializers, FoldBatchNorm, LowerRecurrent, UnrollLoops]
