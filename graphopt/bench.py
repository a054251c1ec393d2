"""``graphopt bench``: time an artifact next to ONNX Runtime, on the same inputs and threads.

Each runtime runs in a child process of its own (``python -m graphopt.bench``),
so its peak memory is its own: the artifact's compiled code in one, ONNX
Runtime on the artifact's ``model.onnx`` in the other. The parent

1. writes the inputs to a private folder, starts the graphopt worker (which
   loads the artifact and sets its thread pool: the manifest's count, capped),
   then the ONNX Runtime worker with the same ``intra_op_num_threads``;
2. has both compute the outputs once and checks they agree (a mismatch is a
   :class:`~graphopt.errors.VerificationError`, never timed);
3. warms each up, then times them in interleaved rounds (graphopt, ONNX Runtime,
   graphopt, ...) until ``seconds`` are spent (at least ``MIN_ROUNDS``
   rounds); a round runs a chunk of calls per runtime (about 100 ms worth, so
   the first call after a pause weighs little in the median), each call timed
   on its own inside its worker, so the pipe between processes is never inside
   a timed call. Before each turn the other workers must have gone quiet
   (``_wait_quiet``): a runtime's threads that keep spinning after its calls
   would otherwise take the next runtime's cores;
4. reports per runtime median/p10/p90 latency, throughput (batch / median, batch
   = leading dim of the first input), and memory: the worker's peak resident set
   (Linux ``VmHWM``, native allocations included; see :func:`_peak_rss_bytes`) and its
   resident set just before the model was loaded (interpreter, numpy and the
   runtime library), so ``peak - base`` is what the model itself cost.

What one timed call includes, on both sides: numpy inputs in, numpy outputs out
(graphopt: the artifact's program as ``Artifact.run`` calls it, without the
feed checks; ONNX Runtime: ``InferenceSession.run`` with its default graph
optimizations, the way users run it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import ArtifactError, DataError, GraphoptError, OptionError, VerificationError

#: Fewest interleaved rounds, whatever ``seconds`` says.
MIN_ROUNDS = 5
#: A round runs about this long per runtime: the pipe costs little, and a model of a few ms still runs
#: several calls, so the first call after the pause before its turn (threads asleep, caches cold) is not
#: most of what is timed.
CHUNK_SECONDS = 0.1
#: Idle time before each runtime's turn, at least: the runtime that ran last may still have threads
#: spinning for work, and on few cores they would take the next runtime's cores. Where the workers'
#: CPU time can be read (Linux), the wait goes on until they are quiet (:func:`_wait_quiet`): ONNX
#: Runtime's pool keeps a thread spinning for ~40 ms after a call (measured on 2 Zen 4 cores), which
#: made a 14 ms parallel model take 41 ms whenever it ran right after ONNX Runtime.
SETTLE_SECONDS = 0.01
#: A worker is quiet once it burns less than this share of one core over a poll interval.
QUIET_SHARE = 0.05
QUIET_POLL_SECONDS = 0.005
#: Longest wait for the workers to go quiet (a runtime that never idles must not stall the benchmark).
QUIET_MAX_SECONDS = 0.5
#: Most calls one runtime makes in one round.
MAX_CHUNK = 1000
#: Seconds a worker may take to start and load its model before it is given up on.
START_TIMEOUT = 600.0



@dataclass
class _Worker:
    label: str
    proc: subprocess.Popen
    stderr_path: Path

    def ask(self, **request) -> dict:
        """Send one request, return the reply; a worker error or death becomes a GraphoptError."""
        self.send(**request)
        return self.receive()

    def send(self, **request) -> None:
        """Send one request without waiting (:meth:`receive` reads the reply)."""
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker is gone: receive() says why

    def receive(self) -> dict:
        """The reply to the request sent last."""
        try:
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.wait(timeout=30)
            raise GraphoptError(f"the {self.label} worker process died "
                                f"(exit {self.proc.returncode}): {self._last_words()}")
        reply = json.loads(line)
        if "error" in reply:
            kinds = {"ArtifactError": ArtifactError, "DataError": DataError, "OptionError": OptionError}
            raise kinds.get(reply["kind"], GraphoptError)(reply["error"])
        return reply

    def _last_words(self) -> str:
        try:
            lines = [ln for ln in self.stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        return lines[-1].strip() if lines else "no message"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _cpu_seconds(pid: int) -> float | None:
    """CPU time process ``pid`` has used, every thread, or None where it cannot be read.

    Linux's per-thread ``schedstat`` counts nanoseconds on the CPU; the clock-tick
    figures of ``/proc/PID/stat`` are too coarse (10 ms) to see a thread spinning
    for a few milliseconds.
    """
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:  # the thread ended between listing and reading
                continue
    except (OSError, IndexError, ValueError):
        return None
    return total / 1e9


def _wait_quiet(pids: list[int]) -> float:
    """Sleep until the processes ``pids`` have stopped using the CPU (see :data:`SETTLE_SECONDS`); seconds waited.

    Waits :data:`SETTLE_SECONDS` at least, then polls every
    :data:`QUIET_POLL_SECONDS` until every process used under
    :data:`QUIET_SHARE` of a core in the last interval, or
    :data:`QUIET_MAX_SECONDS` have passed.
    """
    start = time.perf_counter()
    time.sleep(SETTLE_SECONDS)
    before = {pid: _cpu_seconds(pid) for pid in pids}
    if any(v is None for v in before.values()):
        return time.perf_counter() - start  # no /proc: the fixed pause is all there is
    since = time.perf_counter()
    while time.perf_counter() - start < QUIET_MAX_SECONDS:
        time.sleep(QUIET_POLL_SECONDS)
        now = time.perf_counter()
        after = {pid: _cpu_seconds(pid) for pid in pids}
        if any(v is None for v in after.values()):
            break
        if max(after[p] - before[p] for p in pids) <= QUIET_SHARE * (now - since):
            break
        before, since = after, now
    return time.perf_counter() - start


def _start(label: str, spec: tuple, feed_path: Path, threads: int | None, tmp: Path) -> _Worker:
    kind, where, *arg = spec
    err = tmp / f"worker{len(list(tmp.glob('*.stderr')))}.stderr"
    cmd = [sys.executable, "-m", "graphopt.bench", "--worker", kind, str(where), str(feed_path),
           str(threads or 0), *(str(a) for a in arg)]
    with open(err, "wb") as ef:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=ef, text=True)
    return _Worker(label, proc, err)


def _stats(times: list[float], batch: int) -> dict:
    a = np.asarray(times, dtype=np.float64)
    med = float(np.median(a))
    return {
        "runs": int(a.size),
        "median_ms": med * 1e3,
        "p10_ms": float(np.percentile(a, 10) * 1e3),
        "p90_ms": float(np.percentile(a, 90) * 1e3),
        "mean_ms": float(a.mean() * 1e3),
        "min_ms": float(a.min() * 1e3),
        "throughput_per_s": batch / med if med > 0 else None,
    }


def batch_of(feed: Mapping[str, np.ndarray], order) -> int:
    """Samples in one call: the leading dim of the first input (1 for a scalar input)."""
    first = np.asarray(feed[order[0]]) if order else None
    return int(first.shape[0]) if first is not None and first.ndim >= 1 else 1


def measure(
    runners: Mapping[str, tuple],
    feed: Mapping[str, np.ndarray],
    output_names,
    *,
    threads: int | None = None,
    seconds: float = 3.0,
    warmup: int = 5,
    reference: str | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    profile: str | None = None,
) -> dict:
    """Time several runtimes on one feed, each in its own worker process, interleaved; the core of :func:`bench`.

    ``runners`` maps a label to a spec, started and timed in this order:
    ``("graphopt", artifact_dir)``, ``("ort", model.onnx)``, or
    ``("python", "file.py:function", arg)`` where ``function(arg, feed, threads)``
    returns ``(call, info)`` (``call()`` runs the model and returns its outputs
    in ``output_names`` order). The first runner gets ``threads`` as a cap; when
    it reports the count it runs with (a graphopt artifact does), every other
    runner gets that count, else ``threads``.

    Outputs are compared with ``reference``'s (``atol`` + ``rtol``·max|ref|); a
    runner that disagrees is not timed and appears in ``"disagree"`` with the
    reason. Returns ``{"runtimes": {label: stats}, "agreement": {label: ...},
    "disagree": {label: summary}, "threads", "batch", "rounds", "seconds"}``;
    stats hold median/p10/p90/mean/min ms, runs, throughput and the worker's
    base and peak RSS (and ``profile`` for the runner named by ``profile``, a
    graphopt one).
    """
    from .reference import compare_outputs

    batch = batch_of(feed, list(feed))
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:  # mode 0700: only this user
        tmp = Path(tmp)
        feed_path = tmp / "feed.npz"
        np.savez(feed_path, **{k: np.asarray(v, order="C") for k, v in feed.items()})
        workers: dict[str, _Worker] = {}
        info: dict[str, dict] = {}
        try:
            n = threads
            items = list(runners.items())
            for label, spec in items[:1]:  # the first one settles the thread count
                workers[label] = w = _start(label, spec, feed_path, n, tmp)
                info[label] = w.ask(op="load")
                if info[label].get("threads"):
                    n = info[label]["threads"]
            # The others start and load at once (each imports its runtime: seconds; nothing is timed yet).
            for label, spec in items[1:]:
                workers[label] = _start(label, spec, feed_path, n, tmp)
                workers[label].send(op="load")
            for label, _ in items[1:]:
                info[label] = workers[label].receive()
            outs, first = {}, {}
            for label, w in workers.items():
                out_path = tmp / f"out{len(outs)}.npz"
                first[label] = w.ask(op="check", path=str(out_path))["seconds"]
                with np.load(out_path) as z:
                    outs[label] = [z[f"o{i}"] for i in range(len(z.files))]
            agreement, disagree = {}, {}
            if reference is not None:
                for label in workers:
                    if label == reference:
                        continue
                    cmp = compare_outputs([outs[reference]], [outs[label]], list(output_names), atol=atol, rtol=rtol)
                    agreement[label] = cmp.to_json()
                    if not cmp.ok:
                        disagree[label] = cmp.summary()
            timed = [label for label in workers if label not in disagree]
            per_call = {}
            for label in timed:
                # The check call was the first warm-up; a runtime slower than the whole timing budget per
                # call gets one more warm-up call, not ``warmup`` of them.
                n_warm = max(warmup, 1) if first[label] * warmup <= seconds else 1
                warm = workers[label].ask(op="run", n=n_warm)["times"]
                # A fast model keeps warming up until a chunk's worth of calls has run: its first calls
                # after loading (lazy set-up, cold caches, sleeping pool threads) can be 100x its steady
                # state, and a chunk sized from them would be a few calls, each timed cold after the
                # settle pause, so the median would measure wake-up, not the model.
                while sum(warm) < CHUNK_SECONDS and len(warm) < MAX_CHUNK:
                    warm += workers[label].ask(op="run", n=min(MAX_CHUNK, 2 * len(warm)))["times"]
                per_call[label] = float(np.median(warm[len(warm) // 2:]))  # the later half: settled
            chunk = {k: int(min(MAX_CHUNK, max(1, round(CHUNK_SECONDS / max(v, 1e-9))))) for k, v in per_call.items()}
            times: dict[str, list[float]] = {k: [] for k in timed}
            rounds = 0
            start = time.perf_counter()
            settled = 0.0
            while timed and (rounds < MIN_ROUNDS or time.perf_counter() - start - settled < seconds):
                for label in timed:
                    settled += _wait_quiet([w.proc.pid for w in workers.values()])
                    times[label] += workers[label].ask(op="run", n=chunk[label])["times"]
                rounds += 1
            measured = time.perf_counter() - start - settled
            prof = None
            if profile in timed:
                prof = workers[profile].ask(op="profile", n=max(3, min(50, chunk[profile] * 3)))["profile"]
            mem = {label: w.ask(op="quit") for label, w in workers.items()}
        finally:
            for w in workers.values():
                w.close()
    runtimes = {}
    for label in workers:
        s = _stats(times[label], batch) if label in times else {}
        s["peak_rss_bytes"] = mem[label]["peak_rss_bytes"]
        s["base_rss_bytes"] = info[label]["base_rss_bytes"]
        s["notes"] = info[label].get("notes", [])
        if label in chunk:
            s["chunk"] = chunk[label]
        if label == profile and prof is not None:
            s["profile"] = prof
        runtimes[label] = s
    return {"runtimes": runtimes, "agreement": agreement, "disagree": disagree, "threads": n, "batch": batch,
            "rounds": rounds, "seconds": measured}


def _check_benchable(path: Path, manifest: dict) -> None:
    """Refuse, before any worker starts, an artifact whose wall-clock time this machine cannot measure or
    that would mean nothing: one it cannot run (a GPU artifact without a GPU), or one whose accelerator is
    simulated here (the tpu target: its modelled cycles are in `graphopt run`'s report)."""
    from .plugins import get_registry

    cls = get_registry().get_target(manifest["target"]["name"])
    if not cls.wall_clock_timing:
        raise ArtifactError(f"{path}: a '{cls.name}' artifact runs its accelerator on a simulator here, so its "
                            "wall-clock time says nothing about the hardware; `graphopt run` reports the "
                            "modelled cycles")
    reason = cls.cannot_run(manifest)
    if reason:
        raise ArtifactError(f"{path}: cannot time it here: {reason}")


def bench(
    artifact: str | os.PathLike,
    feed: Mapping[str, np.ndarray] | None = None,
    *,
    inputs: str | os.PathLike | None = None,
    seed: int = 0,
    threads: int | None = None,
    seconds: float = 3.0,
    warmup: int = 5,
    profile: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> dict:
    """Time ``artifact`` and ONNX Runtime (on its ``model.onnx``) on one feed; returns the measurement.

    The feed is ``feed`` (``{input name: array}``), else the first sample of
    ``inputs`` (.npz/.npy/folder), else generated from ``seed``. ``threads``
    caps both runtimes (default ``$GRAPHOPT_THREADS``, else the artifact's
    count). Raises :class:`VerificationError` when the outputs disagree
    (``atol`` + ``rtol``·max|reference|), :class:`GraphoptError` subclasses for
    a bad artifact, feed or option. See the module doc for what is measured.
    """
    from .artifact import GRAPH_FILE, MANIFEST, _regular_file, check_manifest, sha256_file, thread_cap
    from .data import DataSource, check_feed
    from .graph import Graph, TensorSpec

    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise OptionError(f"seconds = {seconds!r} must be a positive number")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise OptionError(f"warmup = {warmup!r} must be a whole number of runs, 0 or more")
    thread_cap(threads)  # a bad count fails here, before any process starts
    path = Path(artifact)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path}: not a graphopt artifact (no {MANIFEST}); build one with `graphopt lower`")
    try:
        manifest = check_manifest(json.loads(mpath.read_text(encoding="utf-8")), mpath)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{mpath}: unreadable manifest: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for name, digest in manifest["files"].items():  # here too, so a damaged artifact fails before any worker starts
        _regular_file(path / name, path)
        if sha256_file(path / name) != digest:
            raise ArtifactError(f"{path}: file '{name}' does not match its hash in the manifest (modified or damaged)")
    _check_benchable(path, manifest)
    specs = [TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in manifest["inputs"]]
    if feed is not None:
        feed = check_feed(feed, specs, "feed")
    else:
        source = DataSource(inputs, seed=seed, option="--inputs")
        feed = source.samples(Graph.load(path / GRAPH_FILE), limit=1)[0]

    names = [o["name"] for o in manifest["outputs"]]
    from .reference import artifact_tolerance

    atol_q, rtol_q = artifact_tolerance(manifest, atol, rtol)
    runners = {"graphopt": ("graphopt", path), "onnxruntime": ("ort", path / GRAPH_FILE)}
    m = measure(runners, feed, names, threads=threads, seconds=seconds, warmup=warmup, reference="onnxruntime",
                atol=atol_q, rtol=rtol_q, profile="graphopt" if profile else None)
    notes = []
    if "graphopt" in m["disagree"]:
        # ONNX Runtime as users run it (graph optimizations on) fuses QDQ into its own integer kernels, which
        # are not always exact (on AVX2 CPUs without VNNI its u8 x s8 GEMM saturates int16 pair sums). Who is
        # off is settled by its unoptimized run, the reference everything else in graphopt verifies against.
        from .api import load, verify_artifact

        strict = verify_artifact(load(path, threads=threads), data=DataSource(feeds=[feed]), atol=atol, rtol=rtol)
        if not strict.ok:
            raise VerificationError(f"{path}: outputs differ from ONNX Runtime: {m['disagree']['graphopt']}; not timed")
        notes.append(f"ONNX Runtime with its graph optimizations differs from the artifact "
                     f"({m['disagree']['graphopt']}), but its unoptimized run agrees with the artifact (max|Δ| "
                     f"{strict.max_abs:.3g}): the difference is ONNX Runtime's optimized kernels; timed anyway")
        m = measure(runners, feed, names, threads=threads, seconds=seconds, warmup=warmup, reference=None,
                    profile="graphopt" if profile else None)
        m["agreement"]["graphopt"] = strict.to_json()
    result = m["runtimes"]
    n = m["threads"]
    prof = result["graphopt"].pop("profile", None)
    doc = {
        "ok": True,
        "artifact": str(path),
        "inputs": {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in feed.items()},
        "batch": m["batch"],
        "threads": n,
        "notes": result["graphopt"].pop("notes", []) + notes,
        "agreement": m["agreement"]["graphopt"],
        **result,
        "ratio": result["graphopt"]["median_ms"] / result["onnxruntime"]["median_ms"],
        "rounds": m["rounds"],
        "seconds": m["seconds"],
        "memory": "peak_rss_bytes: the worker process's peak resident set (Linux VmHWM); base_rss_bytes: "
                  "its resident set before loading the model (Python, numpy, the runtime library)",
    }
    if prof is not None:
        doc["profile"] = prof
    return doc


def format_report(doc: dict) -> list[str]:
    """The human-readable lines of a :func:`bench` result."""
    from .stats import human_bytes

    lines = [f"{doc['artifact']}: batch {doc['batch']}, {doc['threads']} thread(s) on both sides, "
             f"{doc['rounds']} interleaved rounds in {doc['seconds']:.1f}s; outputs agree "
             f"(max|Δ| {doc['agreement'].get('max_abs', 0) or 0:.2g})"]
    head = f"  {'':<12} {'median':>10} {'p10':>10} {'p90':>10} {'samples/s':>11} {'peak RSS':>10} {'(model)':>10} {'runs':>7}"
    lines.append(head)
    for label in ("graphopt", "onnxruntime"):
        s = doc[label]
        tp = s["throughput_per_s"]
        lines.append(f"  {label:<12} {_ms(s['median_ms']):>10} {_ms(s['p10_ms']):>10} {_ms(s['p90_ms']):>10} "
                     f"{(f'{tp:.1f}' if tp is not None else '-'):>11} {human_bytes(s['peak_rss_bytes']):>10} "
                     f"{human_bytes(max(0, s['peak_rss_bytes'] - s['base_rss_bytes'])):>10} {s['runs']:>7}")
    lines.append(f"  graphopt / onnxruntime: {doc['ratio']:.2f}x latency (median / median; below 1 = faster)")
    lines.append("  peak RSS: each runtime's own process (VmHWM); (model) = peak minus the process "
                 "before loading")
    if doc.get("profile"):
        lines.append("  graphopt kernels (TVM VM instrument, separate runs; share of the time inside calls):")
        for k in doc["profile"][:15]:
            lines.append(f"    {k['share'] * 100:5.1f}%  {_ms(k['ms_per_run']):>9}  {k['name']}")
    return lines


def _ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 0.1:
        return f"{ms:.3f} ms"
    return f"{ms * 1000:.1f} µs"


# --------------------------------------------------------------------------- worker side


def _rss_bytes() -> int:
    """The current resident set (Linux /proc/self/statm), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    """This process's peak resident set: Linux ``VmHWM`` (this program image's own high-water mark).

    Not ``getrusage().ru_maxrss`` on Linux: the kernel carries that over from
    the forking parent across ``exec``, so a worker would report the parent's
    size. Elsewhere ``ru_maxrss`` is the best there is.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def _graphopt_runner(artifact: str, feed: dict, threads: int):
    from .artifact import Artifact

    try:  # the CPU target's runtime library, loaded before the base RSS is read
        import tvm.relax  # noqa: F401
    except ImportError:
        pass

    base = _rss_bytes()
    art = Artifact(artifact, threads=threads or None)
    prog = art.programs["main"]
    args = [np.asarray(feed[s.name], order="C") for s in art.inputs]

    def call():
        return prog(args)

    def profile(n: int) -> list[dict]:
        return _profile(art, args, n)

    cpu = art.manifest["target"]["name"] == "cpu"  # the profiler reads the CPU target's VM library
    return call, {"threads": art.threads, "notes": art.notes, "base_rss_bytes": base}, profile if cpu else None


def _ort_runner(model: str, feed: dict, threads: int):
    from .reference import _ort_severity, onnxruntime

    ort = onnxruntime()
    base = _rss_bytes()
    so = ort.SessionOptions()  # default graph optimizations: ONNX Runtime as users run it
    so.log_severity_level = _ort_severity()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    run_feed = {k: np.asarray(v, order="C") for k, v in feed.items() if k in wanted}

    def call():
        return sess.run(names, run_feed)

    return call, {"threads": threads, "base_rss_bytes": base}, None


def _python_runner(where: str, feed: dict, threads: int, arg: str = ""):
    """``file.py:function``: ``function(arg, feed, threads)`` returns ``(call, info)``; ``call()`` returns the outputs."""
    import importlib.util

    file, _, func = where.rpartition(":")
    spec = importlib.util.spec_from_file_location(f"_graphopt_bench_{Path(file).stem}", file)
    if spec is None or not func:
        raise OptionError(f"{where}: expected FILE.py:FUNCTION")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    base = _rss_bytes()  # after the module's imports (e.g. torch), before the model is built
    call, info = getattr(module, func)(arg, feed, threads)
    return call, {"threads": threads, **info, "base_rss_bytes": base}, None


def _profile(art, args, n: int) -> list[dict]:
    """Per-kernel time of the artifact's ``main`` over ``n`` runs, from TVM's VM instrument hook.

    Each packed call (fused kernel or VM builtin) is timed with perf_counter
    before and after it; a kernel's time per run is the median of its calls
    times its calls per run, so a call that the OS preempted (a busy machine)
    does not dominate. The figures include the hook's own overhead (a few µs
    per call): shares, not absolute kernel times. CPU target only.
    """
    import tvm
    from tvm import relax

    from .artifact import program_weights
    from .targets.cpu import _device_params

    prog = art.manifest["programs"][0]
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(art.path / prog["library"])), dev)
    durations: dict[str, list[float]] = {}
    started: dict[str, list[float]] = {}
    perf = time.perf_counter

    def instrument(func, name, before, ret, *a):
        t = perf()
        if before:
            started.setdefault(name, []).append(t)
        else:
            durations.setdefault(name, []).append(t - started[name].pop())
        return 0  # VMInstrumentReturnKind.NO_OP

    fn = vm[prog.get("entry", "main")]
    params = _device_params(art, dev, program_weights(art.manifest, prog, list(range(len(art.weights)))), {})
    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    fn(*tensors, *params)  # warm (allocations happen on the first call)
    vm.set_instrument(instrument)
    fn(*tensors, *params)  # and once with the hook (its own first-call costs)
    durations.clear()
    for _ in range(n):
        fn(*tensors, *params)
    per_run = {k: float(np.median(d)) * len(d) / n for k, d in durations.items()}
    whole = sum(per_run.values()) or 1.0
    rows = [{"name": k, "ms_per_run": v * 1e3, "share": v / whole, "calls_per_run": len(durations[k]) / n}
            for k, v in per_run.items()]
    return sorted(rows, key=lambda r: -r["ms_per_run"])


def _die_with_parent() -> None:
    """On Linux, have the kernel send this worker SIGTERM when its parent dies (a killed benchmark leaves no
    worker computing on); elsewhere the worker ends at its next request, when stdin is closed."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def worker_main(argv: list[str]) -> int:
    """The child process: ``--worker KIND ARTIFACT FEED THREADS``; JSON requests on stdin, replies on stdout."""
    kind, where, feed_path, threads, extra = argv[0], argv[1], argv[2], int(argv[3]), argv[4:]
    _die_with_parent()
    reply_stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints to stdout goes to stderr, never into the replies

    def reply(doc):
        reply_stream.write(json.dumps(doc) + "\n")

    call = profile = None
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "load":
                with np.load(feed_path) as z:
                    feed = {k: z[k] for k in z.files}
                runner = {"graphopt": _graphopt_runner, "ort": _ort_runner, "python": _python_runner}[kind]
                call, info, profile = runner(where, feed, threads, *extra)
                reply(info)
            elif op == "check":
                t0 = time.perf_counter()
                outs = call()
                first_s = time.perf_counter() - t0
                outs = [outs] if isinstance(outs, np.ndarray) or hasattr(outs, "numpy") else list(outs)
                outs = [o.numpy() if hasattr(o, "numpy") and not isinstance(o, np.ndarray) else o for o in outs]
                np.savez(req["path"], **{f"o{i}": np.asarray(o) for i, o in enumerate(outs)})
                reply({"seconds": first_s})
            elif op == "run":
                perf = time.perf_counter
                times = []
                for _ in range(int(req["n"])):
                    t0 = perf()
                    call()
                    times.append(perf() - t0)
                reply({"times": times})
            elif op == "profile":
                reply({"profile": profile(int(req["n"])) if profile else None})
            elif op == "quit":
                reply({"peak_rss_bytes": _peak_rss_bytes()})
                return 0
        except GraphoptError as e:
            reply({"error": str(e), "kind": type(e).__name__})
        except Exception as e:  # noqa: BLE001 - the runtime failed: one line back to the parent
            text = str(e).strip()
            reply({"error": f"{kind} worker: {type(e).__name__}: {text.splitlines()[-1] if text else ''}",
                   "kind": "GraphoptError"})
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2:]))
    print("graphopt.bench is run by `graphopt bench`; see `graphopt bench --help`", file=sys.stderr)
    sys.exit(2)
