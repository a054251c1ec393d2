"""``graphopt bench``: time an artifact next to ONNX Runtime, on the same inputs and threads.

Each runtime runs in a child process of its own (``python -m graphopt.bench``),
so its peak memory is its own: the artifact's compiled code in one, ONNX
Runtime on the artifact's ``model.onnx`` in the other. The parent

1. writes the inputs to a private folder, starts the graphopt worker (which
   loads the artifact and sets its thread pool: the manifest's count, capped),
   then the ONNX Runtime worker with the same ``intra_op_num_threads``;
2. has both compute the outputs once and checks they agree (a mismatch is a
   :class:`~graphopt.errors.VerificationError`, never timed);
3. warms each up, then times them in interleaved rounds (ONNX Runtime, graphopt,
   ONNX Runtime, ...) until ``seconds`` are spent (at least ``MIN_ROUNDS``
   rounds); a round runs a chunk of calls per runtime (about 5 ms worth), each
   call timed on its own inside its worker, so the pipe between processes is
   never inside a timed call;
4. reports per runtime median/p10/p90 latency, throughput (batch / median, batch
   = leading dim of the first input), and memory: the worker's peak resident set
   (``getrusage(RUSAGE_SELF).ru_maxrss``, native allocations included) and its
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
#: A round runs about this long per runtime (several calls of a fast model), so the pipe costs little.
CHUNK_SECONDS = 0.005
#: Most calls one runtime makes in one round.
MAX_CHUNK = 1000
#: Seconds a worker may take to start and load its model before it is given up on.
START_TIMEOUT = 600.0

_WORKERS = {"graphopt": "graphopt", "ort": "onnxruntime"}


@dataclass
class _Worker:
    kind: str
    proc: subprocess.Popen
    stderr_path: Path

    def ask(self, **request) -> dict:
        """Send one request, return the reply; a worker error or death becomes a GraphoptError."""
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.wait(timeout=30)
            raise GraphoptError(f"the {_WORKERS[self.kind]} worker process died "
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


def _start(kind: str, artifact: Path, feed_path: Path, threads: int | None, tmp: Path) -> _Worker:
    err = tmp / f"{kind}.stderr"
    cmd = [sys.executable, "-m", "graphopt.bench", "--worker", kind, str(artifact), str(feed_path),
           str(threads or 0)]
    env = dict(os.environ)
    with open(err, "wb") as ef:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=ef, text=True, env=env)
    return _Worker(kind, proc, err)


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
    from .reference import compare_outputs

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
    specs = [TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in manifest["inputs"]]
    if feed is not None:
        feed = check_feed(feed, specs, "feed")
    else:
        source = DataSource(inputs, seed=seed, option="--inputs")
        feed = source.samples(Graph.load(path / GRAPH_FILE), limit=1)[0]
    order = [s.name for s in specs]
    batch = batch_of(feed, order)

    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:  # mode 0700: only this user
        tmp = Path(tmp)
        feed_path = tmp / "feed.npz"
        np.savez(feed_path, **{k: np.ascontiguousarray(v) for k, v in feed.items()})
        workers: dict[str, _Worker] = {}
        try:
            workers["graphopt"] = w = _start("graphopt", path, feed_path, threads, tmp)
            info = {"graphopt": w.ask(op="load")}
            n = info["graphopt"]["threads"]
            workers["ort"] = w = _start("ort", path, feed_path, n, tmp)
            info["ort"] = w.ask(op="load")
            outs = {}
            for kind, w in workers.items():
                out_path = tmp / f"{kind}-out.npz"
                w.ask(op="check", path=str(out_path))
                with np.load(out_path) as z:
                    outs[kind] = [z[f"o{i}"] for i in range(len(z.files))]
            names = [o["name"] for o in manifest["outputs"]]
            cmp = compare_outputs([outs["ort"]], [outs["graphopt"]], names, atol=atol, rtol=rtol)
            if not cmp.ok:
                raise VerificationError(f"{path}: outputs differ from ONNX Runtime: {cmp.summary()}; not timed")
            per_call = {}
            for kind, w in workers.items():
                t = w.ask(op="run", n=max(warmup, 1))["times"]
                per_call[kind] = float(np.median(t))
            chunk = {k: int(min(MAX_CHUNK, max(1, round(CHUNK_SECONDS / max(v, 1e-9))))) for k, v in per_call.items()}
            times: dict[str, list[float]] = {k: [] for k in workers}
            rounds = 0
            start = time.perf_counter()
            while rounds < MIN_ROUNDS or time.perf_counter() - start < seconds:
                for kind in ("ort", "graphopt"):
                    times[kind] += workers[kind].ask(op="run", n=chunk[kind])["times"]
                rounds += 1
            measured = time.perf_counter() - start
            prof = workers["graphopt"].ask(op="profile", n=max(3, min(50, chunk["graphopt"] * 3)))["profile"] \
                if profile else None
            mem = {kind: w.ask(op="quit") for kind, w in workers.items()}
        finally:
            for w in workers.values():
                w.close()

    result = {}
    for kind, label in (("graphopt", "graphopt"), ("ort", "onnxruntime")):
        s = _stats(times[kind], batch)
        s["peak_rss_bytes"] = mem[kind]["peak_rss_bytes"]
        s["base_rss_bytes"] = info[kind]["base_rss_bytes"]
        s["chunk"] = chunk[kind]
        result[label] = s
    doc = {
        "ok": True,
        "artifact": str(path),
        "inputs": {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in feed.items()},
        "batch": batch,
        "threads": n,
        "notes": info["graphopt"].get("notes", []),
        "agreement": cmp.to_json(),
        **result,
        "ratio": result["graphopt"]["median_ms"] / result["onnxruntime"]["median_ms"],
        "rounds": rounds,
        "seconds": measured,
        "memory": "peak_rss_bytes: the worker process's peak resident set (getrusage ru_maxrss); base_rss_bytes: "
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
    lines.append("  peak RSS: each runtime's own process, getrusage maxrss; (model) = peak minus the process "
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
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def _graphopt_runner(artifact: str, feed: dict, threads: int):
    from .artifact import Artifact

    try:  # the CPU target's runtime library, loaded before the base RSS is read
        import tvm  # noqa: F401
        import tvm.relax  # noqa: F401
    except ImportError:
        pass

    base = _rss_bytes()
    art = Artifact(artifact, threads=threads or None)
    prog = art.programs["main"]
    args = [np.ascontiguousarray(feed[s.name]) for s in art.inputs]

    def call():
        return prog(args)

    def profile(n: int) -> list[dict]:
        return _profile(art, args, n)

    return call, {"threads": art.threads, "notes": art.notes, "base_rss_bytes": base}, profile


def _ort_runner(artifact: str, feed: dict, threads: int):
    from .artifact import GRAPH_FILE
    from .reference import _ort_severity, onnxruntime

    ort = onnxruntime()
    base = _rss_bytes()
    so = ort.SessionOptions()  # default graph optimizations: ONNX Runtime as users run it
    so.log_severity_level = _ort_severity()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(Path(artifact) / GRAPH_FILE), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    run_feed = {k: np.ascontiguousarray(v) for k, v in feed.items() if k in wanted}

    def call():
        return sess.run(names, run_feed)

    return call, {"threads": threads, "base_rss_bytes": base}, None


def _profile(art, args, n: int) -> list[dict]:
    """Per-kernel time of the artifact's ``main`` over ``n`` runs, from TVM's VM instrument hook.

    Each packed call (fused kernel or VM builtin) is timed with perf_counter
    before and after it, so the figures include a few µs of hook overhead per
    call: shares, not absolute kernel times. CPU target only.
    """
    import tvm
    from tvm import relax

    from .targets.cpu import _device_params

    prog = art.manifest["programs"][0]
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(art.path / prog["library"])), dev)
    total: dict[str, float] = {}
    calls: dict[str, int] = {}
    started: dict[str, list[float]] = {}
    perf = time.perf_counter

    def instrument(func, name, before, ret, *a):
        t = perf()
        if before:
            started.setdefault(name, []).append(t)
        else:
            total[name] = total.get(name, 0.0) + t - started[name].pop()
            calls[name] = calls.get(name, 0) + 1
        return 0  # VMInstrumentReturnKind.NO_OP

    fn = vm[prog.get("entry", "main")]
    params = _device_params(art, dev)
    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    fn(*tensors, *params)  # warm (allocations happen on the first call)
    vm.set_instrument(instrument)
    for _ in range(n):
        fn(*tensors, *params)
    whole = sum(total.values()) or 1.0
    rows = [{"name": k, "ms_per_run": v / n * 1e3, "share": v / whole, "calls_per_run": calls[k] / n}
            for k, v in total.items()]
    return sorted(rows, key=lambda r: -r["ms_per_run"])


def worker_main(argv: list[str]) -> int:
    """The child process: ``--worker KIND ARTIFACT FEED THREADS``; JSON requests on stdin, replies on stdout."""
    kind, artifact, feed_path, threads = argv[0], argv[1], argv[2], int(argv[3])
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
                runner = _graphopt_runner if kind == "graphopt" else _ort_runner
                call, info, profile = runner(artifact, feed, threads)
                reply(info)
            elif op == "check":
                outs = call()
                np.savez(req["path"], **{f"o{i}": np.asarray(o) for i, o in enumerate(outs)})
                reply({})
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
            reply({"error": f"{_WORKERS[kind]} failed: {type(e).__name__}: {text.splitlines()[-1] if text else ''}",
                   "kind": "GraphoptError"})
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2:]))
    print("graphopt.bench is run by `graphopt bench`; see `graphopt bench --help`", file=sys.stderr)
    sys.exit(2)
