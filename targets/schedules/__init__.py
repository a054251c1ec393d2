"""Default CPU schedules: rules applied to every fused TIR function before codegen, no tuning needed.

The idea is TVM's dlight (``tvm.s_tir.dlight``), whose CPU rules cover only
GEMV and reductions: each rule looks at one fused PrimFunc and either returns
a schedule for it or ``None`` (not mine). :func:`default_rules` lists them in
the order they are tried; the first rule that claims a function schedules it.
Every rule reads the vector width and core count from the target, never from a
hard-coded CPU, so the same rules serve AVX-512, AVX2+FMA and portable builds.

One module per family of operators:

- :mod:`.gemm` — matmul, dense, batch-matmul (and their fused epilogues);
- :mod:`.conv` — convolutions and pooling;
- :mod:`.elementwise` — injective ops, softmax / layer-norm style reductions,
  and the fallback that parallelizes and vectorizes anything else.
"""

from __future__ import annotations


def default_rules() -> list:
    """The schedule rules, most specific first, for ``dlight.ApplyDefaultSchedule``."""
    from .conv import conv_rules
    from .elementwise import elementwise_rules
    from .gemm import gemm_rules

    return [*gemm_rules(), *conv_rules(), *elementwise_rules()]
