"""The ``cuda`` target: TVM's CUDA backend, device code compiled ahead of time for one GPU architecture.

Lowering needs a CUDA compiler (``nvcc`` from the CUDA toolkit, else NVRTC
through the ``cuda-bindings`` Python package), not a GPU: the architecture is
the ``arch`` option (default: the local GPU's, else ``sm_80``).

TVM 0.27 keeps CUDA source in the compiled module and compiles it when the
module is loaded (its ``tvm_callback_cuda_compile``), so a machine running the
artifact would need a CUDA compiler too. This target compiles the source when
lowering instead: ``main.so`` (host code, with the CUDA source inside) comes
with ``main.fatbin`` (nvcc: SASS for ``arch`` plus its PTX, which newer GPUs
compile at load) or ``main.cubin`` (NVRTC), and loading hands TVM that binary
for exactly that source (matched by its SHA-256), so running needs only the
GPU driver.

Loading refuses, with one line, a machine without a CUDA GPU, a GPU older
than ``arch`` (or, for an ``sm_90a``-style arch-specific build, a different
one) and a different host CPU architecture.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import re
import shutil
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphopt.artifact import program_weights
from graphopt.console import step
from graphopt.errors import ArtifactError, GraphoptError, LoweringError, OptionError
from graphopt.graph import Graph
from graphopt.options import Option
from graphopt.relax import identifier_params, import_graph, output_specs, raise_if_unsupported, select_params
from graphopt.target import LowerContext, Target

#: The architecture built for when ``arch=auto`` and no CUDA GPU is visible (A100; runs on any newer GPU
#: through the PTX kept in the fatbin).
DEFAULT_ARCH = "sm_80"
#: ``sm_<major><minor>``, with ``a`` (arch-specific features, runs on that GPU only) or ``f`` (family).
ARCH_RE = re.compile(r"^sm_(\d+)(\d)([af]?)$")
#: Architectures assumed when the compiler cannot list its own (NVRTC without nvrtcGetSupportedArchs).
KNOWN_ARCHS = ("sm_50", "sm_52", "sm_53", "sm_60", "sm_61", "sm_62", "sm_70", "sm_72", "sm_75", "sm_80", "sm_86",
               "sm_87", "sm_88", "sm_89", "sm_90", "sm_100", "sm_101", "sm_103", "sm_110", "sm_120", "sm_121")
#: The compile callback TVM's CUDA runtime calls for a module that holds source.
CALLBACK = "tvm_callback_cuda_compile"
#: Files the device code is written to, by compiler.
DEVICE_CODE_FILE = {"nvcc": "main.fatbin", "nvrtc": "main.cubin"}
NVCC_TIMEOUT_S = 600

COMPILER_MISSING = ("target 'cuda': needs the CUDA compiler nvcc (CUDA toolkit) or NVRTC (the cuda-bindings "
                    "package); none found (install the CUDA toolkit or put nvcc on PATH)")


# -- The CUDA compiler ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CudaCompiler:
    """The compiler found: ``kind`` nvcc or nvrtc, its path (nvcc), version and the archs it builds for."""

    kind: str
    path: str | None
    version: str
    archs: tuple[str, ...]

    def supports(self, arch: str) -> bool:
        m = ARCH_RE.match(arch)
        if not m:
            return False
        base = f"sm_{m.group(1)}{m.group(2)}"
        major = int(m.group(1))
        if base not in self.archs:
            return False
        # Arch-specific (sm_90a...) from Hopper on, family-specific (sm_100f...) from Blackwell on.
        return m.group(3) == "" or (m.group(3) == "a" and major >= 9) or (m.group(3) == "f" and major >= 10)

    def choices(self) -> list[str]:
        return sorted(self.archs, key=arch_number)


def arch_number(arch: str) -> int:
    """``sm_86`` -> 86 (the suffix dropped)."""
    m = ARCH_RE.match(arch)
    return int(m.group(1) + m.group(2)) if m else -1


def nvcc_candidates() -> list[Path]:
    """Where nvcc is looked for, in order: ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``PATH``, and
    ``/usr/local/cuda/bin`` only when neither variable names a toolkit (a variable set is taken as the
    user's choice of toolkit, so pointing both at an empty folder and PATH at none hides nvcc)."""
    roots = [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v, "").strip()]
    out = [Path(r) / "bin" / "nvcc" for r in roots]
    found = shutil.which("nvcc")
    if found:
        out.append(Path(found))
    if not roots:
        out.append(Path("/usr/local/cuda/bin/nvcc"))
    return out


_COMPILERS: dict = {}
_LOCK = threading.Lock()


def _run(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def find_nvcc() -> CudaCompiler | None:
    for path in nvcc_candidates():
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        key = ("nvcc", str(path.resolve()))
        with _LOCK:
            if key in _COMPILERS:
                return _COMPILERS[key]
        text = _run([str(path), "--version"])
        if text is None:
            continue
        m = re.search(r"release [\d.]+, V([\d.]+)", text) or re.search(r"release ([\d.]+)", text)
        codes = _run([str(path), "--list-gpu-code"]) or ""
        archs = tuple(sorted({c for c in codes.split() if re.fullmatch(r"sm_\d+", c)}, key=arch_number))
        found = CudaCompiler("nvcc", str(path), m.group(1) if m else "unknown", archs or KNOWN_ARCHS)
        with _LOCK:
            _COMPILERS[key] = found
        return found
    return None


def find_nvrtc() -> CudaCompiler | None:
    with _LOCK:
        if ("nvrtc",) in _COMPILERS:
            return _COMPILERS[("nvrtc",)]
    found = None
    try:
        from cuda.bindings import nvrtc  # the cuda-bindings package (what TVM's NVRTC path uses)

        err, major, minor = nvrtc.nvrtcVersion()
        if err == nvrtc.nvrtcResult.NVRTC_SUCCESS:
            archs = KNOWN_ARCHS
            try:
                err, n = nvrtc.nvrtcGetNumSupportedArchs()
                err2, listed = nvrtc.nvrtcGetSupportedArchs()
                if err == err2 == nvrtc.nvrtcResult.NVRTC_SUCCESS and listed:
                    archs = tuple(f"sm_{int(a)}" for a in listed)
            except Exception:  # an older binding: the known list stands
                pass
            found = CudaCompiler("nvrtc", None, f"{major}.{minor}", archs)
    except Exception:  # not installed, or no libnvrtc behind it
        found = None
    with _LOCK:
        _COMPILERS[("nvrtc",)] = found
    return found


def find_compiler(which: str = "auto") -> CudaCompiler | None:
    """The CUDA compiler to build with: ``which`` = nvcc, nvrtc or auto (nvcc if found, else NVRTC)."""
    if which in ("auto", "nvcc"):
        found = find_nvcc()
        if found or which == "nvcc":
            return found
    return find_nvrtc()


def compile_device_code(compiler: CudaCompiler, source: str, arch: str, scratch: Path, fast_math: bool) -> bytes:
    """The CUDA ``source`` compiled for ``arch``: a fatbin (SASS + PTX) with nvcc, a cubin with NVRTC."""
    if compiler.kind == "nvcc":
        m = ARCH_RE.match(arch)
        virt = f"compute_{m.group(1)}{m.group(2)}{m.group(3)}"
        scratch = scratch.resolve()
        scratch.mkdir(parents=True, exist_ok=True)
        src = scratch / "kernels.cu"
        out = scratch / "kernels.fatbin"
        src.write_text(source, encoding="utf-8")
        # TVM's own nvcc flags (tvm.support.nvcc), fast math only when asked for. A fixed file name: the
        # output does not depend on the scratch folder.
        cmd = [compiler.path, "--fatbin", "-O3", "-gencode", f"arch={virt},code=[{arch},{virt}]",
               "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
               "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
               "--expt-relaxed-constexpr", "--expt-extended-lambda", "-w",
               *(["--use_fast_math"] if fast_math else []), "-o", out.name, src.name]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=scratch, timeout=NVCC_TIMEOUT_S,
                                  env={**os.environ, "TMPDIR": str(scratch)})
        except subprocess.TimeoutExpired:
            raise LoweringError(f"nvcc did not finish in {NVCC_TIMEOUT_S} s compiling the CUDA kernels") from None
        except OSError as e:
            raise LoweringError(f"cannot run nvcc ({compiler.path}): {e}") from None
        if proc.returncode != 0:
            errors = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "error" in ln.lower()]
            detail = (errors or (proc.stderr + proc.stdout).strip().splitlines() or ["no output"])[0].strip()
            raise LoweringError(f"nvcc ({compiler.path}) failed to compile the CUDA kernels for {arch}: {detail}")
        data = out.read_bytes()
        src.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        return data
    from tvm.support import nvcc as tvm_nvcc

    try:
        return bytes(tvm_nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvrtc",
                                           options=["--use_fast_math"] if fast_math else None))
    except Exception as e:
        lines = str(e).strip().splitlines()
        detail = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else type(e).__name__)
        raise LoweringError(f"NVRTC failed to compile the CUDA kernels for {arch}: {detail}") from e


# -- The compile callback ------------------------------------------------------------------------------

#: What answers TVM's compile callback on this thread: a function of the CUDA source returning its device
#: code (or None: not ours). TVM calls the callback synchronously, on the thread that compiles or loads.
_LOCAL = threading.local()
_DISPATCH: dict = {"installed": False, "previous": None}


def _source_key(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def _dispatch(code):
    """TVM's ``tvm_callback_cuda_compile``: while graphopt lowers, its compiler; while it loads an artifact,
    the device code compiled for that very source; otherwise TVM's own callback (what TVM would have done)."""
    provide = getattr(_LOCAL, "provide", None)
    if provide is not None:
        data = provide(str(code))
        if data is not None:
            return data
    previous = _DISPATCH["previous"]
    if previous is None:
        raise RuntimeError("graphopt's cuda target: no device code for this CUDA source and no CUDA compiler callback")
    return previous(code)


def install_callback() -> None:
    """Make :func:`_dispatch` TVM's CUDA compile callback (once per process; TVM's own is kept behind it)."""
    import tvm_ffi

    with _LOCK:
        if _DISPATCH["installed"]:
            return
        try:
            importlib.import_module("tvm.support.nvcc")  # (registers TVM's callback first: it refuses to be replaced later)
        except Exception:
            pass
        _DISPATCH["previous"] = tvm_ffi.get_global_func(CALLBACK, allow_missing=True)
        tvm_ffi.register_global_func(CALLBACK, _dispatch, override=True)
        _DISPATCH["installed"] = True


@contextmanager
def providing(fn):
    """Within the block, TVM's CUDA compile callback on this thread asks ``fn(source)`` first: while
    lowering, graphopt's compiler (TVM with the CUDA runtime compiles at build time, by default with
    NVRTC); while loading, the artifact's precompiled device code."""
    install_callback()
    saved = getattr(_LOCAL, "provide", None)
    _LOCAL.provide = fn
    try:
        yield
    finally:
        _LOCAL.provide = saved


# -- The GPU -------------------------------------------------------------------------------------------

def local_gpu(index: int = 0) -> str | None:
    """The compute capability (``"8.6"``) of CUDA GPU ``index`` of this machine, or None when there is none."""
    try:
        import tvm

        dev = tvm.cuda(index)
        if not dev.exist:
            return None
        return str(dev.compute_version)
    except Exception:
        return None


def _cc(version: str) -> tuple[int, int]:
    major, _, minor = version.partition(".")
    return int(major), int(minor or 0)


def _arch_cc(arch: str) -> tuple[int, int]:
    m = ARCH_RE.match(arch)
    return int(m.group(1)), int(m.group(2))


# -- Kernels -------------------------------------------------------------------------------------------

_KERNEL_RE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(')


def kernel_names(source: str) -> list[str]:
    """Names of the ``__global__`` functions defined in CUDA ``source`` (each once)."""
    return sorted(set(_KERNEL_RE.findall(source)))


def _launches_threads(func) -> bool:
    """Whether a scheduled TIR PrimFunc binds GPU threads (blockIdx/threadIdx): it runs as device kernels."""
    text = func.script()
    return "T.thread_binding" in text or "blockIdx." in text or "threadIdx." in text or "T.launch_thread" in text


def device_functions(mod) -> dict[str, bool]:
    """``{name: binds threads}`` of every TIR PrimFunc of the compiled Relax module that runs on the GPU
    (those not marked for the host)."""
    from tvm import tirx

    out = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        attrs = func.attrs if func.attrs is not None else {}
        target = attrs.get("target")
        if (target is not None and target.kind.name != "cuda") or attrs.get("tirx.is_host_func"):
            continue  # host code: the shape functions of dynamic shapes (VMShapeLower)...
        out[gv.name_hint] = _launches_threads(func)
    return out


def cuda_module(runtime_mod):
    """The CUDA module in ``runtime_mod``'s import tree, or None."""
    stack = [runtime_mod]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            return m
        stack.extend(m.imports)
    return None


def cuda_source(mod) -> str:
    """The CUDA source of a CUDA module (TVM keeps it; a module compiled at build time holds it as 'cuda')."""
    for fmt in ("cuda", ""):
        try:
            text = mod.inspect_source(fmt)
        except Exception:
            continue
        if text and "__global__" in text:
            return text
    return ""


def _capture(store: dict):
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="graphopt.cuda.capture")
    def _pass(mod, _ctx):
        store["mod"] = mod
        return mod

    return _pass


# -- The target ----------------------------------------------------------------------------------------

#: Static shared memory one CUDA thread block may use (48 KiB on every arch; more needs dynamic shared memory).
MAX_SHARED_BYTES = 48 << 10


def _shared_bytes(space) -> int:
    """Shared memory the scheduled function(s) ``space`` allocate in blocks (0 when none; a buffer of
    symbolic size is left to the compiler)."""
    from tvm import s_tir

    if space is None:
        return 0
    worst = 0
    for sch in ([space] if isinstance(space, s_tir.Schedule) else list(space)):
        for func in sch.mod.functions.values():
            worst = max(worst, sum(_buffer_bytes(b) for b in _alloc_buffers(getattr(func, "body", None))
                                   if str(b.scope()).startswith("shared")))
    return worst


def _alloc_buffers(stmt, out=None) -> list:
    """Every buffer allocated by an s_tir block (``alloc_buffers``) under ``stmt``. TVM's
    ``calculate_allocated_bytes`` counts only lowered allocations, and 0.27 has no Python TIR visitor:
    the statement tree is walked through its fields."""
    out = [] if out is None else out
    if stmt is None:
        return out
    out.extend(getattr(stmt, "alloc_buffers", None) or [])
    for field in ("block", "body", "init", "then_case", "else_case"):
        child = getattr(stmt, field, None)
        if child is not None and not isinstance(child, (int, float, str)):
            _alloc_buffers(child, out)
    for child in getattr(stmt, "seq", None) or []:
        _alloc_buffers(child, out)
    return out


def _buffer_bytes(buf) -> int:
    from tvm import tirx

    n = 1
    for d in buf.shape:
        if not isinstance(d, tirx.IntImm):
            return 0
        n *= int(d.value)
    return n * max(1, _dtype_bits(buf.dtype) // 8)


def _dtype_bits(dtype) -> int:
    import numpy as np

    try:
        return np.dtype(str(dtype)).itemsize * 8
    except TypeError:
        return 32


def guarded(rule, failures: list):
    """``rule`` (a dlight ScheduleRule) that declines, instead of raising, a function it fails on.

    dlight's GPU rules claim some kernels they then cannot schedule (on ppocrv6-rec, Matmul: "consumers of
    the cache-write stage that are not properly inlined"; on ddddocr, a rule using ``and`` on a TIR
    expression); one raise stopped the whole build. Declined, the kernel goes to the next rule (Fallback
    last). ``failures`` collects ``(rule, function, message)`` for the build's notes."""
    from tvm.s_tir.dlight import ScheduleRule

    class _Guarded(ScheduleRule):
        def apply(self, func, target, tunable):
            name = func.attrs["global_symbol"] if func.attrs is not None and "global_symbol" in func.attrs else "?"
            try:
                space = rule.apply(func, target, tunable)
            except Exception as e:  # noqa: BLE001 - any failure of this rule: let the next one try
                failures.append((type(rule).__name__, str(name), _one_line(e)))
                return None
            shared = _shared_bytes(space)
            if shared > MAX_SHARED_BYTES:
                # ptxas would refuse the kernel ("uses too much shared data"): a conv that GeneralReduction
                # staged whole in shared memory (ppocrv6-rec: 360 KiB).
                failures.append((type(rule).__name__, str(name), f"{shared} bytes of shared memory, over "
                                 f"the {MAX_SHARED_BYTES} a block may use"))
                return None
            return space

        def __repr__(self):
            return f"guarded({type(rule).__name__})"

    return _Guarded()


class CudaTarget(Target):
    """NVIDIA GPUs through TVM's CUDA backend: dlight GPU schedules, device code compiled ahead of time."""

    name = "cuda"
    options = (
        Option("arch", str, "auto",
               f"GPU architecture to build for, sm_<major><minor> (sm_80: A100, sm_86: RTX 30xx, sm_89: L4/RTX 40xx, "
               f"sm_90: H100; sm_90a-style arch-specific builds run on that GPU only): 'auto' is the local "
               f"GPU's, else {DEFAULT_ARCH}; code runs on that GPU and newer ones"),
        Option("opt_level", int, 3, "TVM optimization level", min=0, max=3),
        Option("compiler", str, "auto",
               "CUDA compiler for the device code: nvcc (from $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, else "
               "/usr/local/cuda/bin), nvrtc (the cuda-bindings package), or auto (nvcc if found, else NVRTC)",
               choices=("auto", "nvcc", "nvrtc")),
        Option("fast_math", bool, False,
               "compile with --use_fast_math (approximate exp/div/sqrt, denormals flushed to zero): faster "
               "transcendental ops, results further from ONNX Runtime's"),
    )

    def __init__(self, **options):
        super().__init__(**options)
        #: (rule, function, message) of each dlight rule that failed on a kernel and declined it (see guarded)
        self.rule_failures: list = []
        arch = self.opts.arch.strip()
        self.compiler = find_compiler(self.opts.compiler)
        if arch != "auto" and not (ARCH_RE.match(arch) and (self.compiler is None or self.compiler.supports(arch))):
            who = (f"{self.compiler.kind} {self.compiler.version} builds for" if self.compiler
                   else "known CUDA architectures are")
            choices = self.compiler.choices() if self.compiler else list(KNOWN_ARCHS)
            raise OptionError(f"target 'cuda': option 'arch' = '{self.opts.arch}' is not a GPU architecture this "
                              f"build can target; {who}: auto, {', '.join(choices)} (plus an 'a' suffix from sm_90 "
                              "on, 'f' from sm_100 on: sm_90a)")
        if self.compiler is None:
            raise LoweringError(COMPILER_MISSING if self.opts.compiler == "auto" else
                                {"nvcc": "target 'cuda': compiler=nvcc, but nvcc was not found (install the CUDA "
                                         "toolkit, put nvcc on PATH or set CUDA_HOME)",
                                 "nvrtc": "target 'cuda': compiler=nvrtc, but NVRTC is not available (pip install "
                                          "cuda-bindings, with the CUDA runtime libraries)"}[self.opts.compiler])
        self.notes: list[str] = []
        if arch == "auto":
            arch = self._auto_arch()
        self.arch = arch

    def _auto_arch(self) -> str:
        cc = local_gpu()
        if cc is None:
            self.notes.append(f"note: no CUDA GPU visible: building for {DEFAULT_ARCH} (runs on A100 and newer "
                              "GPUs); pass --target-opt arch=sm_XX for another one")
            arch = DEFAULT_ARCH
        else:
            arch = "sm_" + "".join(map(str, _cc(cc)))
            self.notes.append(f"note: building for this machine's GPU ({arch}, compute capability {cc})")
        if not self.compiler.supports(arch):
            older = [a for a in self.compiler.choices() if arch_number(a) <= arch_number(arch)]
            if not older:
                raise OptionError(f"target 'cuda': {self.compiler.kind} {self.compiler.version} cannot build for "
                                  f"{arch} nor an older architecture (it builds for "
                                  f"{', '.join(self.compiler.choices())}); "
                                  "pass --target-opt arch=... or use an older CUDA toolkit")
            self.notes.append(f"note: {self.compiler.kind} {self.compiler.version} does not build for {arch}: "
                              f"building for {older[-1]} (its PTX runs on {arch})")
            arch = older[-1]
        return arch

    def check(self, graph: Graph) -> None:
        # No native recurrences: LSTM/GRU/RNN are unrolled by the 'lower-recurrent' pass (the default
        # lower pipeline of a target without native_ops runs it); the message says so.
        raise_if_unsupported(graph, self.name)

    def select_params(self, graph: Graph) -> list[str]:
        return select_params(graph)

    def schedule_rules(self, tvm_target) -> list:
        """TVM's dlight GPU rules, most specific first; Fallback last, so every kernel binds threads."""
        from tvm.s_tir.dlight import gpu

        rules = [gpu.Matmul(), gpu.GEMV(), gpu.LowBatchGEMV(), gpu.Reduction(), gpu.GeneralReduction(),
                 gpu.Transpose(), gpu.RMSNorm()]
        # Fallback unguarded: a kernel it cannot schedule is an error that names it, not host code.
        return [*(guarded(r, self.rule_failures) for r in rules), gpu.Fallback()]

    def tvm_target(self):
        import tvm

        from .cpu import PORTABLE_CPU, llvm_target

        host = llvm_target(PORTABLE_CPU.get(platform.machine(), "generic"), 1)
        return tvm.target.Target({"kind": "cuda", "arch": self.arch, "host": host})

    def lower(self, graph: Graph, out_dir: Path, ctx: LowerContext) -> dict:
        import tvm

        from .cpu import PORTABLE_CPU, _triple, isa_features

        if ctx.tune_trials:
            if local_gpu() is None:
                raise OptionError("target 'cuda': tuning for cuda needs a CUDA GPU to measure on, and this machine "
                                  "has none; lower without --tune (dlight's default GPU schedules)")
            raise OptionError("target 'cuda': --tune is not supported for cuda yet (graphopt's tuner measures on "
                              "the CPU); lower without --tune (dlight's default GPU schedules)")
        ctx.native_log.extend(self.notes)
        arch, compiler = self.arch, self.compiler
        target = self.tvm_target()
        host_mcpu = PORTABLE_CPU.get(platform.machine(), "generic")
        scratch = out_dir / ".scratch"
        scratch = scratch if scratch.is_dir() else out_dir / ".cuda-scratch"
        fast_math = self.opts.fast_math

        compiled: dict[str, bytes] = {}  # this build's device code, by source

        def compile_fn(code: str) -> bytes:
            key = _source_key(code)
            if key not in compiled:
                compiled[key] = compile_device_code(compiler, code, arch, scratch, fast_math)
            return compiled[key]

        with step(ctx.progress, "import into TVM Relax"):
            # Kernel signatures are C source: parameters named like `dense/kernel:0` must be identifiers.
            mod = identifier_params(import_graph(graph, ctx.params))
        outputs = output_specs(mod, graph)
        captured: dict = {}
        try:
            with step(ctx.progress, f"compile for CUDA {arch}"):
                pipeline = tvm.transform.Sequential([self.compile_pipeline(target), _capture(captured)])
                with providing(compile_fn), tvm.transform.PassContext(opt_level=self.opts.opt_level):
                    ex = tvm.compile(mod, target=target, relax_pipeline=pipeline)
            cmod = cuda_module(ex.mod)
            source = cuda_source(cmod) if cmod is not None else ""
            names = kernel_names(source)
            ctx.native_log.extend(self._check_kernels(graph, captured.get("mod"), names))
            for rule, func, msg in self.rule_failures:
                ctx.native_log.append(f"note: dlight's {rule} rule failed on {func} ({msg}); a later rule scheduled it")
            self.rule_failures.clear()
            with step(ctx.progress, f"compile device code ({compiler.kind} {compiler.version}, {arch})"):
                key = _source_key(source) if source else None
                code = compile_fn(source) if source else None
            with step(ctx.progress, "export"):
                ex.export_library(str(out_dir / "main.so"))
                device_file = DEVICE_CODE_FILE[compiler.kind]
                if source:
                    (out_dir / device_file).write_bytes(code)
        except GraphoptError:
            raise
        except Exception as e:
            raise LoweringError(f"{graph.source or 'model'}: TVM failed to compile for CUDA {arch}: "
                                f"{_one_line(e)}") from e
        finally:
            if scratch.name == ".cuda-scratch":
                shutil.rmtree(scratch, ignore_errors=True)
        return {
            "target": {
                "name": self.name,
                "options": dict(sorted(vars(self.opts).items())),
                "arch": arch,
                "compiler": compiler.kind,
                "cuda_version": compiler.version,
                "tvm_target": {"kind": "cuda", "arch": arch},
                "kernels": len(names),
                "kernel_names": names,
                "device_code": device_file if source else None,
                "device_code_source_sha256": key,
                "host": {"mcpu": host_mcpu, "triple": _triple()},
                "isa_features": isa_features(host_mcpu),
                "machine": platform.machine(),
            },
            "programs": [{"name": "main", "library": "main.so", "entry": "main", "device": "cuda",
                          "params": list(range(len(ctx.weights)))}],
            "weights": ctx.weights,
            **({"outputs": outputs} if outputs else {}),
        }

    @staticmethod
    def _check_kernels(graph: Graph, compiled, names: list[str]) -> list[str]:
        """Every TIR function meant for the GPU has device code (``<name>_kernel``...): one that no schedule
        bound to threads is compiled by TVM as host code, which would read device memory from the CPU."""
        if compiled is None:
            return []
        funcs = device_functions(compiled)
        where = graph.source or "model"
        unbound = sorted(n for n, bound in funcs.items() if not bound)
        have = set(names)
        missing = sorted(n for n in funcs if not any(re.fullmatch(rf"{re.escape(n)}_kernel(_?\d+)?", k) for k in have))
        bound_no_code = [n for n in unbound if n not in missing]
        notes = [f"note: {len(bound_no_code)} GPU function(s) no schedule rule claimed got device code from "
                 f"TVM's own binding: {', '.join(bound_no_code[:5])}"] if bound_no_code else []
        if missing:
            why = (" (no schedule rule bound them to GPU threads, so TVM compiled them as host code)"
                   if set(missing) <= set(unbound) else "")
            raise LoweringError(f"{where}: {len(missing)} GPU function(s) got no device code{why}: "
                                f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
        return notes

    # -- running --------------------------------------------------------------------------------------

    def cannot_run_here(self) -> str | None:
        cc = local_gpu()
        if cc is None:
            return (f"built for CUDA {self.arch}; this machine has no CUDA GPU (run it where one is, or lower "
                    "with --target cpu)")
        return _gpu_mismatch(self.arch, cc)

    @classmethod
    def cannot_run(cls, manifest: dict) -> str | None:
        t = manifest.get("target") or {}
        arch = str(t.get("arch", DEFAULT_ARCH))
        if t.get("machine") and t["machine"] != platform.machine():
            return f"built for a {t['machine']} host, this machine is {platform.machine()}"
        from .cpu import missing_features

        missing = missing_features(t.get("isa_features", []))
        if missing:
            return f"its host code uses {', '.join(missing)}, which this CPU lacks"
        cc = local_gpu()
        if cc is None:
            return (f"built for CUDA {arch}; this machine has no CUDA GPU (run it where one is, or lower with "
                    "--target cpu)")
        return _gpu_mismatch(arch, cc)

    @classmethod
    def load_programs(cls, artifact) -> dict:
        import tvm
        from tvm import relax

        t = artifact.manifest["target"]
        index = _device_index(artifact)
        reason = cls.cannot_run(artifact.manifest)
        if reason is None and index:
            cc = local_gpu(index)
            reason = (f"this machine has no CUDA GPU {index}" if cc is None
                      else _gpu_mismatch(str(t.get("arch", DEFAULT_ARCH)), cc, index))
        if reason:
            raise ArtifactError(f"{artifact.path}: {reason}")
        device_file, key = t.get("device_code"), t.get("device_code_source_sha256")
        device_code = None
        if device_file and key:
            if device_file not in artifact.manifest.get("files", {}):
                raise ArtifactError(f"{artifact.path}: device code '{device_file}' is not among the hashed files "
                                    "(damaged artifact)")
            try:
                device_code = (artifact.path / device_file).read_bytes()
            except OSError as e:
                raise ArtifactError(f"{artifact.path}: cannot read device code '{device_file}': {e}") from e

        def precompiled(code: str) -> bytes | None:
            return device_code if device_code is not None and _source_key(code) == key else None
        dev = tvm.cuda(index)
        programs = {}
        loaded: dict[int, object] = {}
        for prog in artifact.manifest["programs"]:
            wanted = program_weights(artifact.manifest, prog, list(range(len(artifact.weights))))
            params = []
            for i in wanted:
                if i not in loaded:
                    loaded[i] = tvm.runtime.tensor(np.ascontiguousarray(artifact.weights[i]), dev)
                params.append(loaded[i])
            try:
                with providing(precompiled):  # TVM "compiles" the module's CUDA source as it loads it
                    lib = tvm.runtime.load_module(str(artifact.path / prog["library"]))
                    vm = relax.VirtualMachine(lib, dev)
            except Exception as e:
                raise ArtifactError(f"{artifact.path}: cannot load '{prog['library']}' on CUDA GPU {index}: "
                                    f"{_one_line(e)}") from e
            programs[prog["name"]] = _GpuRunner(vm[prog.get("entry", "main")], params, dev)
        return programs


def _gpu_mismatch(arch: str, cc: str, index: int = 0) -> str | None:
    """Why GPU ``index`` (compute capability ``cc``) cannot run code built for ``arch``, or None."""
    m = ARCH_RE.match(arch)
    if not m:
        return f"built for an unknown CUDA architecture '{arch}'"
    have, need = _cc(cc), _arch_cc(arch)
    name = f"sm_{have[0]}{have[1]}"
    if m.group(3) == "a" and have != need:
        return (f"built for {arch} (arch-specific code), this machine's GPU {index} is {name}; "
                f"lower with --target-opt arch={name}")
    if m.group(3) == "f" and (have[0] != need[0] or have < need):
        return (f"built for {arch} (family-specific code), this machine's GPU {index} is {name}; "
                f"lower with --target-opt arch={name}")
    if have < need:
        return (f"built for CUDA {arch}; this machine's GPU {index} is older ({name}, compute capability {cc}); "
                f"lower with --target-opt arch={name}")
    return None


def _device_index(artifact) -> int:
    device = getattr(artifact, "device", None)
    if device in (None, "", "cuda"):
        return 0
    kind, _, idx = str(device).partition(":")
    if kind != "cuda" or (idx and not idx.isdigit()):
        raise ArtifactError(f"{artifact.path}: a 'cuda' artifact runs on a CUDA GPU ('cuda' or 'cuda:N'), "
                            f"not on '{device}'")
    return int(idx or 0)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Did you forget to bind" in ln or "Error" in ln or "error" in ln:
            return ln
    return lines[-1] if lines else type(e).__name__


class _GpuRunner:
    """Calls a program on the GPU: inputs copied to the device per call, outputs copied back to numpy.
    Calls are serialized (a Relax VM keeps a call's registers in the VM object)."""

    def __init__(self, fn, params, dev):
        self.fn = fn
        self.params = params
        self.dev = dev
        self._lock = threading.Lock()

    def __call__(self, arrays):
        import tvm

        with self._lock:
            inputs = [tvm.runtime.tensor(np.ascontiguousarray(a), self.dev) for a in arrays]
            res = self.fn(*inputs, *self.params)
            items = list(res) if not hasattr(res, "numpy") else [res]
            return [x.numpy() for x in items]
