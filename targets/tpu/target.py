"""The ``tpu`` target: matmul / conv regions on a simulated systolic array, everything else on the host CPU.

A MODEL of a TPU-style matrix unit for design-space exploration, not a driver. Lowering imports the graph
into Relax, cuts the regions out (:mod:`.partition`: int8 QDQ regions, bit-exact in their integer part, and
float32 matmuls / convs as bf16 regions), and compiles the rest for the host CPU as the ``cpu`` target does
(its default schedules, NCHW kept). Each region is a ``call_dps_packed("graphopt.tpu.run", blob, a, b)``
whose blob (region id + :func:`.isa.encode` program) is a constant in ``main.so``; loading registers that
function, which runs :func:`.sim.run` and accumulates each region's cycle counts for :meth:`run_report`.
"""

from __future__ import annotations

import platform
import threading
from pathlib import Path

import numpy as np

from graphopt.console import step
from graphopt.errors import ArtifactError, GraphoptError, LoweringError, OptionError
from graphopt.graph import Graph
from graphopt.options import Option
from graphopt.target import LowerContext, Target

from . import isa


def _cpu():
    from graphopt.targets import cpu

    return cpu


class TpuTarget(Target):
    """A simulated TPU-style systolic array (a design-space model, not a driver) for matmul/conv, host CPU for the rest."""

    name = "tpu"
    wall_clock_timing = False  # the array is simulated: host time says nothing about it
    options = (
        Option("array", int, 128, "systolic array size: rows = cols = array (a power of two)"),
        Option("rows", int, 0, "array rows (the K extent of a weight tile); 0: same as array", min=0),
        Option("cols", int, 0, "array columns (the N extent of a weight tile); 0: same as array", min=0),
        Option("buffer_kib", int, 24576, "on-chip unified buffer (activations + weight tiles), KiB"),
        Option("acc_kib", int, 4096, "accumulator memory, KiB"),
        Option("bandwidth_gbs", float, 30.0, "off-chip memory bandwidth, GB/s"),
        Option("clock_mhz", float, 700.0, "array clock, MHz"),
        Option("float_regions", bool, True,
               "float32 matmuls / convs run on the array as bf16 regions (lossy); false: only int8 QDQ regions"),
        Option("mcpu", str, "host", "LLVM cpu for the host code: 'host' (detected), 'portable', or a name"),
    )

    def __init__(self, **options):
        super().__init__(**options)
        self.config = self._config()
        self.config.check()  # OptionError naming the option, before anything compiles

    def _config(self) -> isa.ArrayConfig:
        o = self.opts
        for name in ("rows", "cols"):
            v = getattr(o, name)
            if v and (v < 2 or v & (v - 1) or v > isa.MAX_ARRAY):
                raise OptionError(f"target 'tpu': option '{name}' = {v!r} must be a power of two of at most {isa.MAX_ARRAY} "
                                  "(e.g. 64, 128, 256)")
        return isa.ArrayConfig(rows=o.rows or o.array, cols=o.cols or o.array, buffer_kib=o.buffer_kib,
                               acc_kib=o.acc_kib, bandwidth_gbs=float(o.bandwidth_gbs), clock_mhz=float(o.clock_mhz))

    def resolve_mcpu(self) -> str:
        cpu = _cpu()
        return cpu.CpuTarget(mcpu=self.opts.mcpu).resolve_mcpu()

    def schedule_rules(self, tvm_target) -> list:
        from graphopt.targets.schedules import default_rules

        return default_rules()

    def check(self, graph: Graph) -> None:
        from graphopt.relax import raise_if_unsupported

        raise_if_unsupported(graph, self.name)

    def select_params(self, graph: Graph) -> list[str]:
        from graphopt.relax import select_params

        return select_params(graph)

    def lower(self, graph: Graph, out_dir: Path, ctx: LowerContext) -> dict:
        import tvm

        from graphopt.relax import import_graph, output_specs

        from .partition import partition

        cpu = _cpu()
        mcpu = self.resolve_mcpu()
        features = cpu.isa_features(mcpu)
        missing = cpu.missing_features(features)
        if missing:
            ctx.native_log.append(f"note: building the host code for {mcpu}, which uses {missing} that this CPU lacks")
        target = cpu.llvm_target(mcpu, ctx.threads)
        with step(ctx.progress, "import into TVM Relax"):
            mod = import_graph(graph, ctx.params)
        outputs = output_specs(mod, graph)
        try:
            with step(ctx.progress, "partition matmul / conv regions for the array"):
                mod, result = partition(mod, self.config, float_regions=self.opts.float_regions)
            with step(ctx.progress, f"compile the host code for {mcpu} (llvm)"):
                with tvm.transform.PassContext(opt_level=3, config=cpu.pass_config()):
                    ex = tvm.compile(mod, target=target, relax_pipeline=self.compile_pipeline(target))
                ex.export_library(str(out_dir / "main.so"))
        except GraphoptError:
            raise
        except Exception as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise LoweringError(f"{graph.source or 'model'}: TVM failed to compile for tpu (host {mcpu}): {msg}") from e
        off, host = result.offloaded_macs, result.host_macs
        return {
            "target": {
                "name": self.name,
                "options": dict(sorted(vars(self.opts).items())),
                "tvm_target": {"kind": "llvm", "mcpu": mcpu, "triple": cpu._triple(), "num-cores": ctx.threads,
                               **({"mattr": list(target.attrs["mattr"])} if "mattr" in target.attrs else {})},
                "threads": ctx.threads,
                "mcpu": mcpu,
                "isa_features": features,
                "machine": platform.machine(),
                "accelerator": "tpu-sim",
                "array": self.config.to_json(),
                "regions": result.regions,
                "int8_regions": sum(1 for r in result.regions if r["dtype"] == "int8"),
                "bf16_regions": sum(1 for r in result.regions if r["dtype"] == "bf16"),
                "host_ops": result.host,
                "offloaded_macs": off,
                "host_macs": host,
                "offloaded_share": off / (off + host) if off + host else 0.0,
                # QDQ nodes compiled (the host quantizes activations): checked with quantization tolerances.
                "quantize_nodes": sum(1 for n in graph.graph.node if n.op_type in cpu.QUANTIZE_OPS),
            },
            "programs": [{"name": "main", "library": "main.so", "entry": "main", "device": "cpu",
                          "accelerator": "tpu-sim", "params": list(range(len(ctx.weights)))}],
            "weights": ctx.weights,
            **({"outputs": outputs} if outputs else {}),
        }

    # ------------------------------------------------------------------------------------------ run time
    @classmethod
    def cannot_run(cls, manifest: dict) -> str | None:
        """The host code's machine and CPU features (the array is simulated: it runs wherever they do)."""
        return _cpu().host_cannot_run(manifest)

    @classmethod
    def load_programs(cls, artifact) -> dict:
        import tvm
        from tvm import relax

        from graphopt.artifact import program_weights, run_threads

        cpu = _cpu()
        t = artifact.manifest["target"]
        reason = cls.cannot_run(artifact.manifest)
        if reason:
            raise ArtifactError(f"{artifact.path}: {reason}")
        want, artifact.notes = run_threads(t.get("threads"), artifact.thread_cap)
        artifact.threads, note = cpu.configure_thread_pool(want)
        artifact.notes += [note] if note else []
        register_run_func()
        stats = artifact.__dict__.setdefault("tpu_stats", {})
        programs = {}
        dev = tvm.cpu()
        loaded: dict[int, object] = {}
        for prog in artifact.manifest["programs"]:
            wanted = program_weights(artifact.manifest, prog, list(range(len(artifact.weights))))
            params = cpu._device_params(artifact, dev, wanted, loaded)
            lib = tvm.runtime.load_module(str(artifact.path / prog["library"]))
            vm = relax.VirtualMachine(lib, dev)
            programs[prog["name"]] = _SimRunner(vm[prog.get("entry", "main")], params, stats)
        return programs

    @classmethod
    def modelled_seconds(cls, artifact, feed) -> float | None:
        """The array's modelled time for one run of ``feed`` (its regions' cycles at the clock; the host part
        is not modelled). Runs the artifact once, with its own statistics."""
        before = {rid: s.cycles for rid, (_, s) in getattr(artifact, "tpu_stats", {}).items()}
        artifact.run(feed)
        stats = getattr(artifact, "tpu_stats", {})
        cycles = sum(s.cycles - before.get(rid, 0) for rid, (_, s) in stats.items())
        cfg = artifact.manifest["target"].get("array") or {}
        clock = float(cfg.get("clock_mhz") or 0) * 1e6
        return cycles / clock if clock else None

    @classmethod
    def run_report(cls, artifact) -> dict | None:
        """Per-region simulator statistics of every call run so far through ``artifact`` (None before any)."""
        from .sim import RegionStats

        t = artifact.manifest.get("target", {})
        stats = getattr(artifact, "tpu_stats", None)
        if not stats:
            return None
        regions, total = [], RegionStats()
        # Read defensively: a damaged manifest's report fields must not fail a run that succeeded.
        regs = t.get("regions")
        by_id = {r.get("id"): r for r in regs if isinstance(r, dict)} if isinstance(regs, list) else {}
        for rid in sorted(stats):
            calls, s = stats[rid]
            total.add(s)
            r = by_id.get(rid, {})
            regions.append({"id": rid, "kind": r.get("kind"), "dtype": r.get("dtype"), "shape": r.get("shape"),
                            "k": r.get("k"), "n": r.get("n"), "calls": calls, **s.to_json()})
        cfg = t.get("array") if isinstance(t.get("array"), dict) else {}
        clock = float(cfg.get("clock_mhz") or 0) * 1e6
        return {
            "model": "tpu-sim: a parameterized model of a systolic-array matrix unit (design-space exploration, not a driver)",
            "array": cfg,
            "regions": regions,
            "total": {**total.to_json(), "calls": sum(c for c, _ in stats.values()),
                      "seconds": total.cycles / clock if clock else None},
            "offloaded_share": t.get("offloaded_share"),
            "offloaded_macs": t.get("offloaded_macs"),
            "host_macs": t.get("host_macs"),
            "int8_regions": t.get("int8_regions"),
            "bf16_regions": t.get("bf16_regions"),
        }

    @classmethod
    def report_lines(cls, doc: dict | None) -> list[str]:
        """A compact table of :meth:`run_report`'s document."""
        if not doc:
            return []
        a = doc.get("array", {})
        lines = [f"tpu-sim {a.get('rows')}x{a.get('cols')} array @ {a.get('clock_mhz')} MHz, "
                 f"{a.get('bandwidth_gbs')} GB/s, buffer {a.get('buffer_kib')} KiB, acc {a.get('acc_kib')} KiB "
                 "(a model of such hardware for design-space exploration, not a driver)",
                 f"{'region':>6} {'kind':<4} {'dtype':<5} {'K':>6} {'N':>6} {'calls':>5} {'MACs':>12} "
                 f"{'cycles':>12} {'util':>6} {'loaded':>10} {'stored':>10}"]
        for r in doc["regions"]:
            lines.append(f"{r['id']:>6} {r['kind'] or '?':<4} {r['dtype'] or '?':<5} {r['k'] or 0:>6} {r['n'] or 0:>6} "
                         f"{r['calls']:>5} {r['macs']:>12} {r['cycles']:>12} {100 * r['utilization']:>5.1f}% "
                         f"{r['bytes_loaded']:>10} {r['bytes_stored']:>10}")
        t = doc["total"]
        share = doc.get("offloaded_share")
        secs = t.get("seconds")
        lines.append(f"{'total':>6} {'':<4} {'':<5} {'':>6} {'':>6} {t['calls']:>5} {t['macs']:>12} {t['cycles']:>12} "
                     f"{100 * t['utilization']:>5.1f}% {t['bytes_loaded']:>10} {t['bytes_stored']:>10}"
                     + (f"  ({secs * 1e6:.1f} us modelled)" if secs is not None else "")
                     + (f"; {100 * share:.1f}% of matmul/conv MACs offloaded" if share is not None else ""))
        return lines


# ---------------------------------------------------------------------------------------- the run-time function
_LOCAL = threading.local()  # .stats: the accumulator of the artifact whose program this thread is running
_REGISTERED = False
_REGISTER_LOCK = threading.Lock()


def _run(blob, a, b, out) -> None:
    """``graphopt.tpu.run``: one region on the simulator, its result written into ``out`` (DPS)."""
    from . import sim
    from .partition import FLAG_B_TRANSPOSED, read_blob

    rid, flags, program = read_blob(np.from_dlpack(blob))
    av, bv = np.from_dlpack(a), np.from_dlpack(b)
    if flags & FLAG_B_TRANSPOSED:
        bv = bv.T
    res, st = sim.run(program, av, bv)
    o = np.from_dlpack(out)
    if res.shape != o.shape:
        res = res.reshape(o.shape)
    np.copyto(o, res, casting="same_kind")
    acc = getattr(_LOCAL, "stats", None)
    if acc is not None:
        hit = acc.get(rid)
        if hit is None:
            acc[rid] = [1, st]
        else:
            hit[0] += 1
            hit[1].add(st)


def register_run_func() -> None:
    """Register ``graphopt.tpu.run`` (process-wide, once; before any VM that calls it is built)."""
    global _REGISTERED
    import tvm

    from .partition import RUN_FUNC

    with _REGISTER_LOCK:
        if not _REGISTERED:
            tvm.register_global_func(RUN_FUNC, _run, override=True)
            _REGISTERED = True


class _SimRunner:
    """cpu's ``_Runner`` with this artifact's stats accumulator active for the calls it makes."""

    def __init__(self, fn, params, stats: dict):
        self.runner = _cpu()._Runner(fn, params)
        self.stats = stats

    def __call__(self, arrays):
        prev = getattr(_LOCAL, "stats", None)
        _LOCAL.stats = self.stats
        try:
            return self.runner(arrays)
        finally:
            _LOCAL.stats = prev
