"""Built-in passes; registered through the ``graphopt`` entry point like any plugin.

One pass per module; helpers they share live in :mod:`graphopt.ir`.
"""

from graphopt.hookspecs import hookimpl


@hookimpl
def graphopt_register_passes():
    from .batchnorm import FoldBatchNorm
    from .cleanup import Cleanup
    from .dedup_initializers import DedupInitializers
    from .distill import Distill
    from .eliminate_dead import EliminateDead
    from .eliminate_identity import EliminateIdentity
    from .fold_constants import FoldConstants
    from .control_flow import UnrollLoops
    from .prune import Prune
    from .quantize import Quantize
    from .recurrent import LowerRecurrent
    from .share import Share

    return [Cleanup, FoldConstants, EliminateIdentity, EliminateDead, DedupInitializers, FoldBatchNorm, LowerRecurrent, UnrollLoops, Quantize, Prune, Distill, Share]
