#!/usr/bin/env python
"""Conv-heavy models: graphopt's default CPU artifact vs ONNX Runtime, with a per-kernel profile.

Models: a ResNet-18-style CNN at 224x224 built here (BasicBlock x [2, 2, 2, 2],
batch-norm, ReLU, max-pool, global average pool, fc; captured with a dynamic
batch and lowered ONCE, then run at batch 1 and 8), the depthwise/test CNN of
``graphopt.testing.torch_models()``, and the real conv models ppocr-cls,
ppocrv4-det, orientation and magika (``graphopt.testing.REAL_MODELS``).

For each model: lower with ``graphopt.lower`` (default schedules, no tuning),
check the artifact's output against ONNX Runtime, then time both interleaved
(ORT, TVM, ORT, TVM, ...), ``--threads`` threads on both sides (ORT
``intra_op_num_threads``, TVM ``TVM_NUM_THREADS`` and the target's
``num-cores``), ``--rounds`` rounds of ``--runs`` calls each; the figure is
median(TVM) / median(ORT). With ``--profile`` the artifact is also run under
``relax.VirtualMachine(..., profile=True)`` and the kernel time is split into
conv, pooling, layout transforms (transpose / layout_transform) and the rest.

Usage::

    python benchmarks/bench_kernels_conv.py                       # every model
    python benchmarks/bench_kernels_conv.py --models resnet18 --profile
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("resnet18", "cnn", "ppocr-cls", "ppocrv4-det", "orientation", "magika")


def resnet18():
    """A ResNet-18-style CNN (torchvision's layout, random weights, non-trivial BN statistics), eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            layers, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(512, 1000)

        def forward(self, x):
            x = self.layers(self.stem(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    m = ResNet18().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def build(name):
    """``(graph, [(label, feed), ...], lower kwargs)`` for a model name."""
    import torch

    import graphopt
    from graphopt.graph import Graph
    from graphopt.testing import REAL_MODELS, fetch_real_model, torch_models

    rng = np.random.default_rng(0)
    if name == "resnet18":
        g = graphopt.capture(resnet18(), (torch.randn(1, 3, 224, 224),), dynamic_batch=True)
        feeds = [(f"batch {b}", {g.inputs[0].name: rng.standard_normal((b, 3, 224, 224)).astype(np.float32)})
                 for b in (1, 8)]
        return g, feeds, {}
    if name == "cnn":
        module, args = torch_models()["cnn"]
        g = graphopt.capture(module, args, dynamic_batch=False)
        return g, [("batch 2", {g.inputs[0].name: args[0].numpy()})], {}
    spec = REAL_MODELS[name]
    repo_cache = Path(__file__).resolve().parents[1] / ".cache" / "models"
    cache = os.environ.get("GRAPHOPT_MODEL_CACHE") or (repo_cache if repo_cache.is_dir() else None)
    g = Graph.load(fetch_real_model(name, cache))
    return g, [("batch 1", spec.make_feeds(0)[0])], {"input_shapes": spec.input_shapes,
                                                     "input_values": spec.input_values}


def ort_session(graph, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(graph.to_bytes(), so, providers=["CPUExecutionProvider"])


def median_time(fn, runs):
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def profile_shares(art_dir, art, feed, repeat=3):
    """Per-category shares of the kernel time: conv, pool, layout transforms, rest.

    TVM 0.27's Relax VM has no profiler, so each VM call is timed with
    ``VirtualMachine.set_instrument`` (perf_counter before / after the call;
    CPU kernels are synchronous), summed over ``repeat`` runs after a warm-up.
    """
    import tvm
    from tvm import relax

    from targets.cpu import _device_params

    dev = tvm.cpu()
    lib = tvm.runtime.load_module(str(Path(art_dir) / "main.so"))
    vm = relax.VirtualMachine(lib, dev)
    args = [tvm.runtime.tensor(feed[s.name], dev) for s in art.inputs] + _device_params(art, dev)
    vm["main"](*args)
    per_kernel: dict[str, float] = {}
    started: list[float] = []

    def instrument(func, name, before, ret, *a):
        if before:
            started.append(time.perf_counter())
        else:
            per_kernel[str(name)] = per_kernel.get(str(name), 0.0) + time.perf_counter() - started.pop()
        return 0

    vm.set_instrument(tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument)
    for _ in range(repeat):
        vm["main"](*args)
    totals: dict[str, float] = {}
    for name, sec in per_kernel.items():
        if name.startswith("vm.builtin"):
            cat = "vm builtins"
        elif "conv" in name:
            cat = "conv"
        elif "pool" in name:
            cat = "pool"
        elif "transpose" in name or "layout_transform" in name:
            cat = "layout"
        else:
            cat = "rest"
        totals[cat] = totals.get(cat, 0.0) + sec
    total = sum(totals.values()) or 1.0
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:6]
    return ({k: v / total for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}, total * 1e6 / repeat,
            [(k, v / total) for k, v in top])


def bound_weights_program(graph, threads, mcpu=None):
    """The model compiled with its weights bound as constants: the weight layout ops fold at compile time.

    This stands in for the prepack step (``LiftTransformParams``, not in this
    branch): what remains to run per call is what a prepacked artifact runs.
    Returns ``run(arrays)``.
    """
    import tvm
    from onnx import numpy_helper
    from tvm import relax

    from targets.cpu import CpuTarget, cpu_pipeline, llvm_target
    from graphopt.relax import import_graph, select_params

    params = select_params(graph)
    inits = {t.name: t for t in graph.graph.initializer}
    mod = import_graph(graph, params)
    main = mod["main"]
    n_in = len(main.params) - len(params)
    binding = {v: tvm.runtime.tensor(numpy_helper.to_array(inits[name]))
               for v, name in zip(main.params[n_in:], params)}
    mod["main"] = main.bind_params(binding)
    opts = {"mcpu": mcpu} if mcpu else {}
    target = llvm_target(CpuTarget(**opts).resolve_mcpu(), threads)
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)

    def run(arrays):
        return vm["main"](*[tvm.runtime.tensor(a, dev) for a in arrays])

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=10, help="calls per runtime per round")
    ap.add_argument("--mcpu", default=None, help="the cpu target's mcpu option (default: host)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--bound", action="store_true",
                    help="also time the model compiled with weights bound (weight layout folded: prepack stand-in)")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import graphopt

    print(f"threads {args.threads}; ratio = median TVM / median ORT, interleaved, {args.rounds} rounds x "
          f"{args.runs} runs")
    ratios, bound_ratios = [], []
    for name in args.models.split(","):
        g, feeds, kw = build(name)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            opts = {"mcpu": args.mcpu} if args.mcpu else None
            res = graphopt.lower(g, "cpu", Path(tmp) / "a", threads=args.threads, target_options=opts, **kw)
            compile_s = time.perf_counter() - t0
            art = graphopt.load(Path(tmp) / "a")
            ref_graph = art.reference_graph() if kw else g
            sess = ort_session(ref_graph, args.threads)
            bound_prog = None
            for label, feed in feeds:
                feed = {k: v for k, v in feed.items() if k in {s.name for s in art.inputs}}
                ort_names = {i.name for i in sess.get_inputs()}
                ofeed = {k: v for k, v in feed.items() if k in ort_names}
                want = sess.run(None, ofeed)
                got = art.run(feed)
                err = max(float(np.max(np.abs(np.asarray(w, np.float64) - np.asarray(o, np.float64))))
                          if np.asarray(w).size else 0.0 for w, o in zip(want, got.values()))
                arrays = [feed[s.name] for s in art.inputs]
                run_tvm = lambda: art.programs["main"](arrays)  # noqa: E731
                run_ort = lambda: sess.run(None, ofeed)  # noqa: E731
                run_tvm(), run_ort()
                run_bound = None
                if args.bound:
                    if bound_prog is None:
                        bound_prog = bound_weights_program(res.graph, args.threads, args.mcpu)
                    run_bound = lambda: bound_prog(arrays)  # noqa: E731
                    bout = run_bound()
                    bout = [bout] if hasattr(bout, "numpy") else list(bout)
                    berr = max(float(np.max(np.abs(np.asarray(w, np.float64) - b.numpy()))) for w, b in zip(want, bout))
                to, tt, tb = [], [], []
                for _ in range(args.rounds):
                    to.append(median_time(run_ort, args.runs))
                    tt.append(median_time(run_tvm, args.runs))
                    if run_bound:
                        tb.append(median_time(run_bound, args.runs))
                r = float(np.median(tt) / np.median(to))
                ratios.append(r)
                print(f"{name:12s} {label:8s} ORT {np.median(to) * 1e3:8.2f} ms  TVM {np.median(tt) * 1e3:8.2f} ms"
                      f"  ratio {r:5.2f}x  (per round {' '.join(f'{b / a:.2f}' for a, b in zip(to, tt))})"
                      f"  max|diff| {err:.2e}  lower {compile_s:.1f} s", flush=True)
                if run_bound:
                    rb = float(np.median(tb) / np.median(to))
                    bound_ratios.append(rb)
                    print(f"{'':12s} {'bound':8s} {'':16s}  TVM {np.median(tb) * 1e3:8.2f} ms  ratio {rb:5.2f}x"
                          f"  (per round {' '.join(f'{b / a:.2f}' for a, b in zip(to, tb))})  max|diff| {berr:.2e}",
                          flush=True)
                if args.profile:
                    shares, total, top = profile_shares(Path(tmp) / "a", art, feed)
                    print("    profile (kernel time %.2f ms): " % (total / 1e3)
                          + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
                    print("    top kernels: " + ", ".join(f"{k} {v:.0%}" for k, v in top))
    if ratios:
        print(f"geometric mean ratio {float(np.exp(np.mean(np.log(ratios)))):.2f}x over {len(ratios)} rows")
    if bound_ratios:
        print(f"geometric mean ratio, weights bound {float(np.exp(np.mean(np.log(bound_ratios)))):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
