"""Built-in TVM targets; registered through the ``graphopt`` entry point like any plugin."""

from graphopt.hookspecs import hookimpl


@hookimpl
def graphopt_register_targets():
    from .cpu import CpuTarget
    from .cuda import CudaTarget
    from .tpu.target import TpuTarget

    return [CpuTarget, CudaTarget, TpuTarget]
