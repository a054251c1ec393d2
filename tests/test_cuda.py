"""The cuda target: compiles here (nvcc, no GPU); runs only where a CUDA GPU is (skipped otherwise)."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
from onnx import helper

from .conftest import init, make_model, ort_run, run_cli, run_cli_subprocess, vi

from graphopt.targets import cuda  # noqa: E402

HAVE_NVCC = cuda.find_nvcc() is not None
HAVE_GPU = cuda.local_gpu() is not None
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="no CUDA compiler (nvcc) on this machine")


def _mlp():
    rng = np.random.default_rng(0)
    return make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["h2"]),
         helper.make_node("Relu", ["h2"], ["h3"]), helper.make_node("MatMul", ["h3", "w2"], ["h4"]),
         helper.make_node("Softmax", ["h4"], ["y"], axis=-1)],
        [vi("x", [2, 32])], [vi("y", [2, 10])],
        [init("w1", rng.standard_normal((32, 64)).astype(np.float32)),
         init("b1", rng.standard_normal(64).astype(np.float32)),
         init("w2", rng.standard_normal((64, 10)).astype(np.float32))])


def _cnn():
    rng = np.random.default_rng(1)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return make_model(
        [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["bn"]),
         helper.make_node("Relu", ["bn"], ["r"]),
         helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("GlobalAveragePool", ["p"], ["gp"]), helper.make_node("Flatten", ["gp"], ["fl"]),
         helper.make_node("Gemm", ["fl", "fw", "fb"], ["y"], transB=1)],
        [vi("x", [1, 3, 16, 16])], [vi("y", [1, 10])],
        [init("cw", f(8, 3, 3, 3)), init("cb", f(8)), init("s", np.abs(f(8)) + 0.5), init("bb", f(8)),
         init("m", f(8)), init("v", np.abs(f(8)) + 0.5), init("fw", f(10, 8)), init("fb", f(10))])


def _save(tmp_path, name, model):
    import onnx

    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def _embedded_source(lib: bytes) -> str:
    """The CUDA source TVM serialized into main.so (length-prefixed, as the CUDA module saves its code)."""
    i = lib.find(b"#ifdef __CUDACC_RTC__")
    assert i > 0, "no CUDA source in main.so"
    while lib[i - 1:i] == b"\n":
        i -= 1
    n = struct.unpack("<Q", lib[i - 8:i])[0]
    return lib[i:i + n].decode()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The MLP and the CNN lowered for sm_80, the CNN for sm_86 (compiled once for the module's tests)."""
    if not HAVE_NVCC:
        pytest.skip("no CUDA compiler (nvcc) on this machine")
    tmp = tmp_path_factory.mktemp("cuda")
    out = {}
    for name, model, arch in (("mlp", _mlp(), "sm_80"), ("cnn", _cnn(), "sm_80"), ("cnn86", _cnn(), "sm_86")):
        src = _save(tmp, name, model)
        art = tmp / f"{name}.art"
        assert run_cli("lower", src, "--target", "cuda", "--target-opt", f"arch={arch}", "-o", art) == 0
        out[name] = (src, art)
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_lowers_with_device_code_for_every_kernel(built, name):
    src, art = built[name]
    t = json.loads((art / "manifest.json").read_text())["target"]
    assert (t["name"], t["arch"], t["compiler"]) == ("cuda", "sm_80", "nvcc")
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", t["cuda_version"])
    assert t["kernels"] == len(t["kernel_names"]) >= (3 if name == "mlp" else 5)
    prog = json.loads((art / "manifest.json").read_text())["programs"][0]
    assert (prog["device"], prog["library"]) == ("cuda", "main.so")
    # Independently of the target's own check: the source inside main.so defines exactly the recorded kernels,
    # the source is what the device code was compiled from, and the fatbin holds code for each of them.
    source = _embedded_source((art / "main.so").read_bytes())
    defined = set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source))
    assert sorted(defined) == t["kernel_names"]
    assert cuda._source_key(source) == t["device_code_source_sha256"]
    fatbin = (art / "main.fatbin").read_bytes()
    assert b"-arch sm_80" in fatbin
    for k in t["kernel_names"]:
        assert k.encode() in fatbin, f"kernel {k} has no device code"


@needs_nvcc
def test_every_scheduled_function_becomes_a_kernel(tmp_path):
    """The kernel count equals the GPU TIR functions TVM compiles (counted on the Relax module, not the source)."""
    import tvm
    from tvm import relax

    from graphopt.graph import Graph
    from graphopt.relax import import_graph, select_params

    tgt = cuda.CudaTarget(arch="sm_80")
    g = Graph(_mlp())
    mod = import_graph(g, select_params(g))
    store: dict = {}
    target = tgt.tvm_target()
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(mod, target=target, relax_pipeline=tvm.transform.Sequential(
            [tgt.compile_pipeline(target), cuda._capture(store)]))
    funcs = [gv.name_hint for gv, f in store["mod"].functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    source = cuda.cuda_source(cuda.cuda_module(ex.mod))
    assert len(funcs) == len(cuda.kernel_names(source)) == source.count("extern \"C\" __global__") // 2
    assert isinstance(ex, relax.VMExecutable)


@needs_nvcc
def test_function_left_unscheduled_is_refused_by_name(tmp_path):
    """Without schedule rules TVM compiles the kernels as host code: the target refuses, naming them."""
    import graphopt
    from graphopt.errors import LoweringError

    class NoRules(cuda.CudaTarget):
        def schedule_rules(self, tvm_target):
            return []

    out = tmp_path / "a"
    with pytest.raises(LoweringError, match=r"got no device code \(no schedule rule bound them.*fused_matmul"):
        graphopt.lower(_save(tmp_path, "mlp", _mlp()), target=NoRules(arch="sm_80"), output=out)
    assert not out.exists()


def test_other_arch_gives_other_device_code(built):
    _, a80 = built["cnn"]
    _, a86 = built["cnn86"]
    t86 = json.loads((a86 / "manifest.json").read_text())["target"]
    assert t86["arch"] == "sm_86"
    f80, f86 = (a80 / "main.fatbin").read_bytes(), (a86 / "main.fatbin").read_bytes()
    assert f80 != f86 and b"-arch sm_86" in f86 and b"-arch sm_86" not in f80


@pytest.mark.parametrize("arch", ["sm_7", "sm80", "compute_80", "sm_70"])
def test_unknown_arch_exits_2_with_one_line_before_any_work(tmp_path, capsys, arch):
    if arch == "sm_70" and not HAVE_NVCC:
        pytest.skip("whether sm_70 is supported depends on the CUDA compiler")
    out = tmp_path / "a"
    assert run_cli("lower", _save(tmp_path, "mlp", _mlp()), "--target", "cuda", "--target-opt", f"arch={arch}",
                   "-o", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "option 'arch'" in err[0] and f"'{arch}'" in err[0] and "sm_80" in err[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["mlp.onnx"]


@pytest.mark.parametrize("compiler", ["nvcc", "auto"])
def test_no_cuda_compiler_exits_2_and_writes_nothing(tmp_path, compiler):
    if compiler == "auto" and cuda.find_nvrtc() is not None:
        pytest.skip("NVRTC is installed: 'auto' would use it")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "a"
    r = run_cli_subprocess("lower", _save(tmp_path, "mlp", _mlp()), "--target", "cuda", "--target-opt",
                           f"compiler={compiler}", "-o", out,
                           env={"PATH": str(empty), "CUDA_HOME": str(empty), "CUDA_PATH": str(empty)})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and "nvcc" in lines[0]
    if compiler == "auto":
        assert "needs the CUDA compiler nvcc (CUDA toolkit) or NVRTC" in lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mlp.onnx"]


@pytest.mark.skipif(HAVE_GPU, reason="this machine has a CUDA GPU")
def test_run_without_gpu_exits_2_with_one_line(built, capsys):
    _, art = built["mlp"]
    capsys.readouterr()
    assert run_cli("run", art) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "built for CUDA sm_80; this machine has no CUDA GPU" in err[0]


@pytest.mark.skipif(HAVE_GPU, reason="this machine has a CUDA GPU")
def test_tune_without_gpu_is_refused(tmp_path, capsys):
    if not HAVE_NVCC:
        pytest.skip("no CUDA compiler (nvcc) on this machine")
    out = tmp_path / "a"
    assert run_cli("lower", _save(tmp_path, "mlp", _mlp()), "--target", "cuda", "--target-opt", "arch=sm_80",
                   "--tune", "4", "-o", out) == 2
    assert "tuning for cuda needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def test_lowering_twice_is_byte_identical(built, tmp_path):
    src, art = built["mlp"]
    again = tmp_path / "again"
    assert run_cli("lower", src, "--target", "cuda", "--target-opt", "arch=sm_80", "-o", again) == 0
    for name in ("manifest.json", "model.onnx", "weights.bin", "main.so", "main.fatbin"):
        assert (art / name).read_bytes() == (again / name).read_bytes(), name


@pytest.mark.skipif(not HAVE_GPU or not HAVE_NVCC, reason="needs a CUDA GPU and nvcc")
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_runs_on_the_gpu_and_matches_onnx_runtime(tmp_path, name):
    import graphopt
    from graphopt.graph import Graph

    model = _mlp() if name == "mlp" else _cnn()
    art = tmp_path / "a"
    assert run_cli("lower", _save(tmp_path, name, model), "--target", "cuda", "-o", art) == 0
    shape = (2, 32) if name == "mlp" else (1, 3, 16, 16)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    got = graphopt.load(art).run({"x": x})
    (ref,) = ort_run(Graph(model), {"x": x})
    np.testing.assert_allclose(list(got.values())[0], ref, rtol=1e-4, atol=1e-5)
    assert run_cli("run", art) == 0


@needs_nvcc
def test_onnx_names_that_are_not_c_identifiers_compile(tmp_path):
    """Exporters name weights `dense/kernel:0` or `layer.0.weight`; kernel signatures are C source (magika,
    ppocr-cls and silero-vad failed in nvcc before parameters were renamed)."""
    rng = np.random.default_rng(5)
    model = make_model(
        [helper.make_node("MatMul", ["in/x:0", "dense/kernel:0"], ["h"]),
         helper.make_node("Add", ["h", "layer.0.bias"], ["y"])],
        [vi("in/x:0", [2, 16])], [vi("y", [2, 8])],
        [init("dense/kernel:0", rng.standard_normal((16, 8)).astype(np.float32)),
         init("layer.0.bias", rng.standard_normal(8).astype(np.float32))])
    out = tmp_path / "names.art"
    assert run_cli("lower", _save(tmp_path, "names", model), "--target", "cuda", "--target-opt", "arch=sm_80",
                   "-o", out, "-q") == 0
    assert json.loads((out / "manifest.json").read_text())["target"]["kernels"] >= 1


def test_a_schedule_rule_that_fails_or_overflows_shared_memory_declines():
    """dlight rules that raise on a kernel, or stage more than a block's shared memory, pass it on to the
    next rule instead of failing the build (ppocrv6-rec, ddddocr)."""
    import tvm
    from tvm import s_tir, te

    a = te.placeholder((256, 256), "float32", name="a")
    k = te.reduce_axis((0, 256), name="k")
    b = te.compute((256,), lambda i: te.sum(a[i, k], axis=k), name="b")
    func = te.create_prim_func([a, b]).with_attr("global_symbol", "rowsum")

    class Raises:
        def apply(self, func, target, tunable):
            raise ValueError("Cannot use and / or / not operator to Expr")

    class StagesAllOfA:  # 256 KiB of shared memory: more than a block may have
        def apply(self, func, target, tunable):
            sch = s_tir.Schedule(func)
            sch.cache_read(sch.get_sblock("b"), 0, "shared")
            return sch

    class Fits:
        def apply(self, func, target, tunable):
            return s_tir.Schedule(func)

    failures: list = []
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    assert cuda.guarded(Raises(), failures).apply(func, target, False) is None
    assert failures[-1][1] == "rowsum" and "Cannot use" in failures[-1][2]
    assert cuda.guarded(StagesAllOfA(), failures).apply(func, target, False) is None
    assert "262144 bytes of shared memory" in failures[-1][2]
    assert cuda.guarded(Fits(), failures).apply(func, target, False) is not None and len(failures) == 2


@needs_nvcc
@pytest.mark.slow
@pytest.mark.realmodel
def test_real_model_compiles_with_device_code_for_every_kernel(real_model, tmp_path):
    """magika (jax2tf): parameter names with '/' and ':', reductions, GELU as basic ops."""
    from graphopt.testing import REAL_MODELS

    out = tmp_path / "magika.art"
    assert run_cli("lower", real_model("magika"), "--target", "cuda", "--target-opt", "arch=sm_80", "-o", out,
                   "-q", *REAL_MODELS["magika"].cli_args()) == 0
    t = json.loads((out / "manifest.json").read_text())["target"]
    source = _embedded_source((out / "main.so").read_bytes())
    assert t["kernels"] >= 10 and sorted(set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(",
                                                         source))) == sorted(t["kernel_names"])


@needs_nvcc
@pytest.mark.skipif(HAVE_GPU, reason="this machine has a CUDA GPU")
def test_lossy_pipeline_lowers_without_a_gpu_and_says_it_was_not_timed(tmp_path):
    """The payoff of lossy passes is timed by running both artifacts: not possible here, and not an error."""
    import graphopt

    res = graphopt.lower(str(_save(tmp_path, "mlp", _mlp())), "cuda", tmp_path / "q.art",
                         pipeline="cleanup,quantize(mode=weight-only,bits=8),cleanup",
                         target_options={"arch": "sm_80"})
    pay = res.report["payoff"]
    assert pay["timed"] is False and "no CUDA GPU" in pay["note"] and pay["kept"] == "with"


@needs_nvcc
@pytest.mark.skipif(HAVE_GPU, reason="this machine has a CUDA GPU")
def test_verify_without_a_gpu_says_where_to_verify_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "v.art"
    assert run_cli("lower", _save(tmp_path, "mlp", _mlp()), "--target", "cuda", "--target-opt", "arch=sm_80",
                   "-o", out, "--verify", "-q") == 2
    err = capsys.readouterr().err
    assert "this machine cannot: built for CUDA sm_80; this machine has no CUDA GPU" in err
    assert "graphopt run --verify" in err and not out.exists() and "Traceback" not in err


@pytest.mark.skipif(HAVE_GPU, reason="this machine has a CUDA GPU")
def test_bench_without_gpu_is_refused_before_any_worker(built, capsys):
    assert run_cli("bench", built["mlp"][1], "--seconds", "0.1") == 2
    err = capsys.readouterr().err
    assert "cannot time it here: built for CUDA sm_80; this machine has no CUDA GPU" in err and "Traceback" not in err
