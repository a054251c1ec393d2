"""The ``cpu`` target: TVM's LLVM backend, built for the host CPU (or a named/portable one).

The CPU model is detected when lowering, never hard-coded; the artifact
records the LLVM cpu name and the instruction-set features the code may use,
and loading refuses, with a clear message, a CPU that lacks any of them
(instead of dying with SIGILL). ``mcpu=portable`` builds for x86-64-v2
(SSE4.2), which runs on any x86-64 machine of the last decade.
"""

from __future__ import annotations

import os
import platform
from bisect import bisect_right
from pathlib import Path

import numpy as np

from graphopt.console import step
from graphopt.artifact import program_weights
from graphopt.errors import ArtifactError, GraphoptError, LoweringError, OptionError
from graphopt.graph import Graph
from graphopt.options import Option
from graphopt.target import LowerContext, Target

from .prepack import lift_weight_transforms, run_weight_transforms
from graphopt.relax import build_pipeline, import_graph, output_specs, raise_if_unsupported, select_params

_INF = float("inf")

#: Most Relax ops fused into one kernel (TVM's default is 256). The kernels the schedules are written
#: for fuse a handful (a convolution, its bias, activation and residual add: 4-8; a GELU as fast-math
#: ops: ~8); a group of a hundred-odd injective ops (an unrolled recurrence's 64 steps stacked by one
#: Concat) made one kernel that took LLVM minutes to compile and ran no faster for it.
MAX_FUSED_OPS = 32


#: ONNX ops that quantize activations (their presence makes an artifact a quantized one).
QUANTIZE_OPS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})


def pass_config() -> dict:
    """TVM PassContext settings the CPU target compiles with."""
    return {"relax.FuseOps.max_depth": MAX_FUSED_OPS}

PORTABLE_CPU = {"x86_64": "x86-64-v2", "aarch64": "generic"}

# LLVM feature name -> Linux /proc/cpuinfo flag, for the ISA extensions that
# change which instructions compiled code may contain.
ISA_FLAGS = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "lzcnt": "abm", "movbe": "movbe", "avx512f": "avx512f", "avx512cd": "avx512cd",
    "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512ifma": "avx512ifma",
    "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq", "avxvnni": "avx_vnni",
    "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq", "sha": "sha_ni", "aes": "aes",
    "pclmul": "pclmulqdq", "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
}


def host_cpu() -> str:
    from tvm.target import codegen

    return codegen.llvm_get_system_cpu()


def llvm_target(mcpu: str, cores: int | None = None, wide_vectors: bool = True):
    """The LLVM target for ``mcpu``; ``num-cores`` (what schedules parallelize for) defaults to every core.

    ``wide_vectors`` (x86 only) clears LLVM's ``prefer-256-bit`` tuning flag, which LLVM sets for Intel
    CPUs with AVX-512 (Ice Lake, Rocket Lake, Sapphire Rapids...). Clang marks a function that uses
    512-bit intrinsics so that it keeps them; TVM's generated functions carry no such mark, so with the
    flag set LLVM split every 512-bit vector of a kernel into 256-bit halves and its own vectorizer
    chose 8-wide loops (measured: a GELU + quantize epilogue 75 -> 54 us, the encoder int8 1.98 ->
    1.73 ms, benchmarks/bench_quant.py). It changes nothing on CPUs without AVX-512."""
    import tvm

    spec = {"kind": "llvm", "mcpu": mcpu, "num-cores": cores or os.cpu_count() or 1}
    if wide_vectors and _triple().startswith(("x86_64", "i386", "i686")):
        spec["mattr"] = ["-prefer-256-bit"]
    return tvm.target.Target(spec)


def isa_features(mcpu: str) -> list[str]:
    """The ISA extensions LLVM enables for ``mcpu`` (the ones code may use)."""
    from tvm.target import codegen

    return sorted(f for f in codegen.llvm_get_cpu_features(llvm_target(mcpu)) if f in ISA_FLAGS)


def host_isa_features() -> set[str]:
    """ISA extensions this machine really has (/proc/cpuinfo where available, else LLVM's view)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {llvm for llvm, flag in ISA_FLAGS.items() if flag in flags}
    except OSError:
        pass
    return set(isa_features(host_cpu()))


def missing_features(required) -> list[str]:
    have = host_isa_features()
    return sorted(set(required) - have)


class CpuTarget(Target):
    """CPU through TVM's LLVM backend, for the host CPU's features (or a portable baseline)."""

    name = "cpu"
    native_ops = ("GRU", "LSTM", "RNN")  # targets/recurrent.py compiles them whole
    options = (
        Option("mcpu", str, "host", "LLVM cpu to build for: 'host' (detected), 'portable', or a name such as znver3"),
        Option("opt_level", int, 3, "TVM optimization level", min=0, max=3),
        Option("int8_kernels", bool, True,
               "quantized (QDQ) matmuls and convolutions as exact integer kernels (AVX-512 VNNI, else AVX2; "
               "see targets/int8.py); false: float arithmetic with the quantization rounding"),
        Option("fast_math", bool, True,
               "float32 exp/erf/tanh/sigmoid/GELU/SiLU/softmax as vectorized polynomials (see targets/fast_math.py) "
               "instead of scalar libm calls"),
        Option("winograd", bool, True,
               "3x3 stride-1 float32 convolutions over large images as Winograd F(4x4)/F(2x2) kernels "
               "(see targets/schedules/winograd.py; outputs differ from a direct conv by float rounding, "
               "the transformed weights add at most the model's own weight bytes again); false: direct convolution only"),
        Option("lowbit_kernels", bool, True,
               "MatMul / Gemm weights that quantize(mode=weight-only) stored as packed low-bit codes stay packed: "
               "the decode runs inside the GEMM (see targets/lowbit.py); false: the decode runs once at lower "
               "time and the float32 weights are stored"),
        Option("wide_vectors", bool, True,
               "on x86 CPUs with AVX-512, let every kernel use 512-bit vectors (LLVM otherwise prefers 256-bit "
               "ones on Intel CPUs); false: LLVM's default"),
    )

    def resolve_mcpu(self) -> str:
        from tvm.target import codegen

        mcpu = self.opts.mcpu
        if mcpu == "host":
            return host_cpu()
        if mcpu == "portable":
            return PORTABLE_CPU.get(platform.machine(), "generic")
        if not codegen.llvm_is_valid_cpu(mcpu, codegen.llvm_get_system_triple()):
            raise OptionError(
                f"target 'cpu': option 'mcpu' = '{mcpu}' is not a CPU LLVM knows "
                "(use 'host', 'portable', or a name such as znver3, skylake-avx512, x86-64-v3)"
            )
        return mcpu

    def schedule_rules(self, tvm_target) -> list:
        from .schedules import default_rules

        return default_rules()

    def check(self, graph: Graph) -> None:
        from . import recurrent

        raise_if_unsupported(graph, self.name, native=recurrent.OPS)

    def select_params(self, graph: Graph) -> list[str]:
        # The codes of weight-only decodes are weights too (integer tensors otherwise are not: shapes,
        # indices): a fused decode reaches its GEMM packed, and one that is not fused is decoded once at
        # lower time instead of folded into constants (targets/lowbit.py, decode_codes).
        codes = set(self._lowbit(graph)[2])
        base = set(select_params(graph))
        return [t.name for t in graph.graph.initializer if t.name in base or t.name in codes]

    def _lowbit(self, graph: Graph) -> tuple:
        """``(graph with unique node names, decodes this build fuses in it, {codes of every weight-only
        decode: decoded float32 bytes})`` of ``graph`` (targets/lowbit.py); found once per graph."""
        from . import lowbit

        cached = getattr(self, "_lowbit_cache", None)
        if cached is None or cached[0] is not graph:  # the cache holds the graph: its identity stays unique
            named = lowbit.named(graph) if self.opts.lowbit_kernels else graph
            fused = lowbit.find_decodes(named) if self.opts.lowbit_kernels else []
            self._lowbit_cache = (graph, named, fused, lowbit.decode_codes(graph))
        return self._lowbit_cache[1:]

    def lower(self, graph: Graph, out_dir: Path, ctx: LowerContext) -> dict:
        import tvm

        mcpu = self.resolve_mcpu()
        features = isa_features(mcpu)
        missing = missing_features(features)
        if missing:
            # Compiling works, but nothing built here could run or be verified here.
            ctx.native_log.append(f"note: building for {mcpu}, which uses {missing} that this CPU lacks")
        target = llvm_target(mcpu, ctx.threads, self.opts.wide_vectors)
        tuner = None
        if ctx.tune_trials:  # validated (database folder, [tune] extra) before any work
            from .tuning import Tuner
            from .schedules import default_rules

            tuner = Tuner(ctx.tune_trials, ctx.tuning_db, target, threads=ctx.threads, progress=ctx.progress,
                          log=ctx.native_log, default_rules=default_rules)
        from . import int8, lowbit, recurrent

        named, decodes, decode_codes = self._lowbit(graph)
        # Decodes left unfused become float weights at lower time: deliberate growth, like Winograd's. Every
        # decode counts (a codes tensor may feed a fused MatMul and an unfused conv): an allowance only.
        # Weights decoded in the graph from other stored forms (prune's sparse values and mask) likewise.
        graph_decoded = lowbit.decoded_weight_bytes(graph)
        unfused_bytes = sum(decode_codes.values()) + graph_decoded
        if graph_decoded:  # say so: the file was smaller, the kernels are not sparse
            ctx.native_log.append(
                f"note: {graph_decoded / 2**10:.0f} KiB of Conv/Gemm/MatMul weights stored in another form in the "
                "model (sparse values and mask, codebook indices) are decoded once, at lower time, and run on the "
                "dense float kernels: no sparse or codebook kernels here")
        lowbit_used: list = []  # LowBitMatMul nodes imported (targets/lowbit.py)
        int8_used: list = []
        winograd_used: list = []  # {"m", "extra_bytes"} of each conv lowered as Winograd F(m x m, 3 x 3)
        recurrences: list = []  # LSTM/GRU/RNN nodes imported whole (targets/recurrent.py)
        int8_kernel = int8.select_kernel(features) if self.opts.int8_kernels else None
        with step(ctx.progress, "import into TVM Relax"):
            # The importer sees the decodes fused; the artifact's model.onnx (the reference) keeps them.
            imported = lowbit.fuse_decodes(named, decodes) if decodes else graph
            mod = import_graph(imported, ctx.params, converters={**recurrent.converters(features, recurrences),
                                                                 **lowbit.converters(features, lowbit_used)})
        outputs = output_specs(mod, graph)  # what the program returns, not what the model declared
        try:
            with step(ctx.progress, "prepack weights"):
                with tvm.transform.PassContext(opt_level=self.opts.opt_level):
                    # Right after ConvertLayout: the transposes it leaves around quantize / dequantize move
                    # out of QDQ chains (every build: the float QDQ lowering of a portable build or of
                    # int8_kernels=false gains too), then the integer kernels, before any float conv rewrite.
                    quantized = [int8.qdq_layout_pass(),
                                 *([int8.int8_matmul_pass(int8_used, int8_kernel)] if int8_kernel else [])]
                    passes = relax_passes(target, fast_math=self.opts.fast_math, winograd=self.opts.winograd,
                                          winograd_used=winograd_used, after_layout=quantized)
                    mod, plan = lift_weight_transforms(
                        mod, target, passes, n_weights=len(ctx.params),
                        allowance=lambda: (sum(u["extra_bytes"] for u in winograd_used) + lowbit.repacked_bytes(decodes)
                                           + unfused_bytes))
                    weights, params = self._pack(plan, out_dir, ctx, target)
                if plan.note:
                    ctx.native_log.append(f"note: {plan.note}")
            with step(ctx.progress, f"compile for {mcpu} (llvm)"):
                with tvm.transform.PassContext(opt_level=self.opts.opt_level, config=pass_config()):
                    ex = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target, tuner))
                addons = []
                scratch = out_dir / ".scratch"
                scratch = scratch if scratch.is_dir() else out_dir
                if int8_used:
                    addons.append(str(int8.kernel_object(scratch, int8_kernel)))
                if recurrences:
                    addons.append(str(recurrent.kernel_object(scratch)))
                if lowbit_used:
                    addons.append(str(lowbit.kernel_object(scratch)))
                ex.export_library(str(out_dir / "main.so"), addons=addons)
                for a in addons:
                    Path(a).unlink(missing_ok=True)
        except GraphoptError:
            raise
        except Exception as e:
            if tuner is not None:
                tuner.reraise()  # the tuning pass's own error or Ctrl-C, which TVM wrapped
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise LoweringError(f"{graph.source or 'model'}: TVM failed to compile for {mcpu}: {msg}") from e
        return {
            "target": {
                "name": self.name,
                "options": dict(sorted(vars(self.opts).items())),
                "tvm_target": {"kind": "llvm", "mcpu": mcpu, "triple": _triple(), "num-cores": ctx.threads,
                               **({"mattr": list(target.attrs["mattr"])} if "mattr" in target.attrs else {})},
                "threads": ctx.threads,
                "mcpu": mcpu,
                "isa_features": features,
                "machine": platform.machine(),
                "int8_matmuls": len(int8_used),
                "int8_implicit_convs": sum(1 for u in int8_used if u.get("implicit")),
                # QDQ nodes compiled: ONNX Runtime fuses them into integer ops that round differently from
                # the QDQ graph's float arithmetic, so the artifact is checked with the quantization
                # tolerances (graphopt.reference.artifact_tolerance) even where QDQ stays float here.
                "quantize_nodes": sum(1 for n in graph.graph.node if n.op_type in QUANTIZE_OPS),
                "int8_kernel": int8_kernel.name if int8_used else None,
                "winograd_convs": len(winograd_used),
                "winograd_extra_bytes": sum(u["extra_bytes"] for u in winograd_used),
                "recurrences": len(recurrences),
                "recurrence_kernel": recurrent.variant(features) if recurrences else None,
                "lowbit_matmuls": len(lowbit_used),
                "lowbit_kernel": lowbit.variant(features) if lowbit_used else None,
                # weights the model decodes in the graph (prune's sparse form, share's codebooks): dense kernels
                "decoded_weight_bytes": graph_decoded,
            },
            "programs": [{"name": "main", "library": "main.so", "entry": "main", "device": "cpu", "params": params}],
            "weights": weights,
            **({"outputs": outputs} if outputs else {}),
            **({"tuning": tuner.manifest()} if tuner is not None else {}),
        }

    @staticmethod
    def _pack(plan, out_dir: Path, ctx: LowerContext, target) -> tuple[list[dict], list[int]]:
        """Run the plan's weight transforms; ``(manifest weight index, indices of main's weights)``."""
        from graphopt.artifact import append_weights, read_weights

        index = list(ctx.weights)
        if not plan.any_packed:
            return index, list(range(len(index)))
        # Large weights go in as copy-on-write maps of weights.bin, not copies (a model may be several GiB).
        originals = [_weight_view(out_dir, e, w) for e, w in zip(index, read_weights(out_dir, index))]
        packed = run_weight_transforms(plan, originals, target)
        names = [f"main.packed.{j}" for j in range(len(packed))]
        index += append_weights(out_dir, index, packed, names)
        refs, j = [], len(ctx.weights)
        for src in plan.sources:
            if src is None:
                refs.append(j)
                j += 1
            else:
                refs.append(src)
        return index, refs

    @classmethod
    def cannot_run(cls, manifest: dict) -> str | None:
        return host_cannot_run(manifest)

    @classmethod
    def load_programs(cls, artifact) -> dict:
        import tvm
        from tvm import relax

        t = artifact.manifest["target"]
        reason = cls.cannot_run(artifact.manifest)
        if reason:
            raise ArtifactError(f"{artifact.path}: {reason}")
        if artifact.device not in (None, "cpu", "cpu:0"):
            raise ArtifactError(f"{artifact.path}: a '{t['name']}' artifact runs on the CPU, not on '{artifact.device}'")
        from graphopt.artifact import run_threads

        want, artifact.notes = run_threads(t.get("threads"), artifact.thread_cap)
        artifact.threads, note = configure_thread_pool(want)
        artifact.notes += [note] if note else []
        programs = {}
        dev = tvm.cpu()
        loaded: dict[int, object] = {}
        for prog in artifact.manifest["programs"]:
            wanted = program_weights(artifact.manifest, prog, list(range(len(artifact.weights))))
            params = _device_params(artifact, dev, wanted, loaded)
            lib = tvm.runtime.load_module(str(artifact.path / prog["library"]))
            vm = relax.VirtualMachine(lib, dev)
            fn = vm[prog.get("entry", "main")]

            programs[prog["name"]] = _Runner(fn, params)
        return programs


def host_cannot_run(manifest: dict) -> str | None:
    """Why this machine cannot run host CPU code built as ``manifest``'s target records it (machine, ISA
    features), or None. Shared by the targets whose programs are CPU code (cpu, tpu)."""
    t = manifest.get("target") or {}
    if t.get("machine") and t["machine"] != platform.machine():
        return f"built for {t['machine']}, this machine is {platform.machine()}"
    missing = missing_features(t.get("isa_features", []))
    if missing:
        return (f"built for CPU '{t.get('mcpu')}' using {', '.join(missing)}, which this CPU ({host_cpu()}) lacks; "
                "lower the model again on this machine, or with --target-opt mcpu=portable")
    return None


class _Runner:
    """Calls a compiled program with as little per-call overhead as the arrays allow.

    A call's fixed cost matters on small models (a few microseconds of
    kernels against ONNX Runtime's ~6 µs per call), so every step is kept to
    what it must do:

    - a small input (up to :data:`STAGE_MAX_BYTES`) is copied into an aligned
      buffer that this thread reuses for that input slot, shape and dtype, whose
      TVM tensor is made once: one ``copyto`` per call, no alignment test and no
      DLPack exchange (TVM requires 64-byte aligned data; numpy's small arrays
      rarely are);
    - a larger one goes in by DLPack without a copy when it is C-contiguous,
      writable, native and aligned, else it is copied once into a fresh aligned
      buffer;
    - outputs come back as zero-copy views of the tensors the program
      allocated for them. An output that shares memory with an input, a weight
      or an earlier output (a program may return an input or a parameter as is)
      is copied, so writing into a result can never change an input, a reused
      buffer or the model.

    Calls from several threads are serialized: a Relax VM keeps each call's
    registers in the VM object, so two calls at once corrupted each other's
    results (each call still uses every core through TVM's thread pool).
    """

    #: Inputs up to this many bytes are staged: copied into an aligned buffer kept per thread and input
    #: (replaced when the shape changes). A fresh aligned copy per call (mmap, page faults, munmap) cost
    #: 120 us for a 128 KiB input, 7 % of an int8 encoder's call; larger inputs still get one.
    STAGE_MAX_BYTES = 1 << 26
    #: Inputs at least this large that TVM can take as they are (C-contiguous, 64-byte aligned, native,
    #: writable) are passed without a copy; below it the copy is cheaper than the zero-copy exchange.
    ZERO_COPY_MIN_BYTES = 1 << 16

    def __init__(self, fn, params):
        import threading

        self.fn = fn
        self.params = params
        self.param_spans = sorted((p.data_ptr(), p.data_ptr() + max(_nbytes(p), 1)) for p in params)
        self._local = threading.local()  # staging buffers are per thread: concurrent calls never share one
        self._lock = threading.Lock()

    @staticmethod
    def _aligned_empty(shape, dtype):
        import numpy as np

        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = np.empty(n + 64, np.uint8)
        off = (-buf.ctypes.data) % 64
        return buf[off:off + n].view(dtype).reshape(shape)

    @classmethod
    def _aligned(cls, a):
        """``a`` itself when TVM can take it without a copy, else an aligned, native, writable copy."""
        import numpy as np

        if a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % 64 == 0 and a.dtype.isnative:
            return a
        out = cls._aligned_empty(a.shape, a.dtype.newbyteorder("="))
        np.copyto(out, a)
        return out

    def _tensor(self, slot: int, a):
        """``(TVM tensor, its data pointer)`` holding input ``a`` for input number ``slot``."""
        nbytes = a.nbytes
        if nbytes >= self.ZERO_COPY_MIN_BYTES and a.flags.c_contiguous and a.flags.writeable \
                and a.dtype.isnative and a.ctypes.data % 64 == 0:
            import tvm

            t = tvm.runtime.from_dlpack(a)
            return t, t.data_ptr()
        if nbytes <= self.STAGE_MAX_BYTES:
            try:
                stages = self._local.stages
            except AttributeError:
                stages = self._local.stages = {}
            hit = stages.get(slot)
            # Same shape and dtype as the staged buffer (the common case, kept cheap: a tiny model's call
            # is a few microseconds).
            if hit is None or hit[3] != a.shape or hit[4] != a.dtype:
                import tvm

                buf = self._aligned_empty(a.shape, a.dtype.newbyteorder("="))
                t = tvm.runtime.from_dlpack(buf)
                hit = stages[slot] = (buf, t, t.data_ptr(), a.shape, a.dtype)
            np.copyto(hit[0], a)
            return hit[1], hit[2]
        import tvm

        t = tvm.runtime.from_dlpack(self._aligned(a))
        return t, t.data_ptr()

    @staticmethod
    def _inside(ptr: int, spans) -> bool:
        i = bisect_right(spans, (ptr, _INF)) - 1
        return i >= 0 and spans[i][0] <= ptr < spans[i][1]

    def __call__(self, arrays):
        tensors, in_spans = [], []
        for slot, a in enumerate(arrays):
            a = np.asarray(a)
            t, ptr = self._tensor(slot, a)
            tensors.append(t)
            in_spans.append((ptr, ptr + max(a.nbytes, 1)))
        in_spans.sort()
        with self._lock:
            res = self.fn(*tensors, *self.params)
        items = list(res) if not hasattr(res, "numpy") else [res]
        outs, seen = [], set()
        for x in items:
            ptr = x.data_ptr()
            a = np.from_dlpack(x)
            if ptr in seen or self._inside(ptr, in_spans) or self._inside(ptr, self.param_spans):
                a = a.copy()
            seen.add(ptr)
            outs.append(a)
        return outs


def _nbytes(t) -> int:
    """Bytes of a TVM tensor's data."""
    import numpy as np

    return int(t.numel()) * np.dtype(str(t.dtype)).itemsize


def relax_passes(target, fast_math: bool = True, winograd: bool = True, winograd_used: list | None = None,
                 after_layout: list = ()) -> list:
    """Relax passes on high-level ops before legalization (layout choices the schedules rely on).

    They run before weight transforms are lifted, so any layout change they
    make to a weight is done once at lower time (see :mod:`.prepack`). With
    ``fast_math`` (the target option, default on), float32 transcendental ops
    become vectorizable polynomial kernels (:mod:`.fast_math`) that fuse into
    their producers' epilogues as the ops they replace did. With ``winograd``
    (the target option, default on), 3x3 stride-1 convs over large images become
    Winograd kernels (:mod:`.schedules.winograd`); ``winograd_used`` collects them.
    ``after_layout``: passes to run right after ``ConvertLayout``, before the conv rewrites
    (the integer-kernel rewrite of :mod:`.int8`).
    """
    from .fast_math import fast_math_pass
    from .layout import normalize_squeeze_axes_pass
    from .schedules.conv import conv_layout_passes

    # Fast math last: its kernels are call_tir, which ConvertLayout cannot see through (it would
    # wrap them in transposes that split a convolution from its epilogue).
    from .schedules.gemm import pack_gemm_weights

    return [normalize_squeeze_axes_pass(), *conv_layout_passes(target, winograd, winograd_used, after_layout),
            pack_gemm_weights(target),
            *([fast_math_pass()] if fast_math else [])]


def cpu_pipeline(target, tuner=None):
    """The Relax pipeline the CPU target compiles with: TVM's CPU pipeline plus graphopt's default schedules.

    With a :class:`~graphopt.targets.tuning.Tuner`, its pass runs first in the
    after-fusion hook: it tunes and applies the database's winning records,
    marking those functions scheduled, so the default rules leave them alone.

    Every fused TIR function is offered to :func:`graphopt.targets.schedules.default_rules`
    (the CPU target's :meth:`~CpuTarget.schedule_rules`; first rule that claims it
    schedules it); a function no rule claims is compiled as TVM legalized it.
    """
    from .schedules.report import report_pass

    tuning = [tuner.pass_()] if tuner is not None else []
    return CpuTarget().compile_pipeline(target, after_fusion=[report_pass(), *tuning])


def _device_params(artifact, dev, wanted, loaded: dict) -> list:
    """The weights numbered ``wanted`` as TVM tensors, each made once (``loaded`` caches them across programs)."""
    index = artifact.manifest.get("weights", [])
    out = []
    for i in wanted:
        if i not in loaded:
            loaded[i] = _device_param(artifact, dev, artifact.weights[i], index[i])
        out.append(loaded[i])
    return out


def _weight_view(art_dir: Path, entry: dict, w):
    """``w`` (a weight of ``weights.bin``), as a writable copy-on-write map when large, else as is."""
    import numpy as np

    from graphopt.artifact import WEIGHTS_FILE

    if w.nbytes < 1 << 20:
        return w
    return np.memmap(art_dir / WEIGHTS_FILE, dtype=w.dtype, mode="c", offset=int(entry["offset"]), shape=w.shape)


def _device_param(artifact, dev, w, entry):
    """One weight as a TVM tensor; a large one shares the pages of weights.bin instead of being copied.

    A copy-on-write map (``mode="c"``) is writable, which DLPack export needs, yet
    shares the file's pages until written; the compiled program never writes
    its parameters. Small weights, or any the zero-copy route refuses, are copied.
    """
    import numpy as np
    import tvm

    from graphopt.artifact import WEIGHTS_FILE

    if w.nbytes >= 1 << 20:
        try:
            shared = np.memmap(artifact.path / WEIGHTS_FILE, dtype=w.dtype, mode="c",
                               offset=int(entry["offset"]), shape=w.shape)
            return tvm.runtime.from_dlpack(shared)
        except (BufferError, OSError, ValueError, TypeError, RuntimeError):
            pass
    return tvm.runtime.tensor(w, dev)


#: How TVM's runtime thread pool behaves, unless the environment already says otherwise (read by TVM
#: when the pool is created):
#: - ``TVM_BIND_THREADS=0``: TVM pins each worker thread to one core. A parallel kernel ends when its
#:   slowest thread does, so on a machine where anything else runs (another service, a build, ONNX
#:   Runtime interleaved with it in ``graphopt bench``) a pinned worker whose core is taken stalls every
#:   parallel kernel while another core may sit idle. Unpinned, the OS puts it on whichever core is free
#:   (ONNX Runtime and torch do not pin their threads either).
#: - ``TVM_THREAD_POOL_SPIN_COUNT``: between parallel kernels a worker spins on ``sched_yield`` this many
#:   times before it sleeps. TVM's default, 300000, keeps a core busy for a tenth of a second or more
#:   after every call, slowing whatever runs next; a few thousand still bridge the microseconds between
#:   the kernels of one call (see benchmarks/bench_threadpool.py for the measurement).
RUNTIME_POOL_ENV = {"TVM_BIND_THREADS": "0", "TVM_THREAD_POOL_SPIN_COUNT": "10000"}


def configure_thread_pool(threads: int) -> tuple[int, str | None]:
    """Set TVM's runtime thread pool (of the calling thread) to ``threads``; returns the count it took and a note.

    TVM 0.27 creates a thread's pool on first use with ``$TVM_NUM_THREADS``
    workers, else half the logical CPUs on x86 (so one thread on a 2-core
    machine), and ``runtime.config_threadpool`` can later lower the count but
    never raise it above that size. So before the pool exists graphopt sets
    ``TVM_NUM_THREADS`` (unless the user did) to at least every core, which
    lets later loads in this process use any count up to that; the count
    actually in effect is read back (``runtime.NumThreads``), and a shortfall
    is returned as a note.
    """
    import tvm

    from graphopt.target import available_cores

    if not os.environ.get("TVM_NUM_THREADS", "").strip():
        # Read by TVM only when the pool is created; harmless once it exists.
        os.environ["TVM_NUM_THREADS"] = str(max(threads, available_cores()))
    for name, value in RUNTIME_POOL_ENV.items():  # the user's own setting wins
        if not os.environ.get(name, "").strip():
            os.environ[name] = value
    # Mode 1 ("big cores"), as TVM configures its pool itself; 0 would mean "TVM's default count".
    tvm.get_global_func("runtime.config_threadpool")(1, int(threads))
    got = int(tvm.runtime.num_threads())
    if got != threads:
        return got, (f"TVM's thread pool in this process has {got} threads, not {threads} "
                     "(it was created earlier with fewer: set TVM_NUM_THREADS before the first run)")
    return got, None


def _triple() -> str:
    from tvm.target import codegen

    return codegen.llvm_get_system_triple()
