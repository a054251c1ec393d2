"""Opt-in tuning of the CPU target: MetaSchedule into a persistent, per-target tuning database.

``graphopt lower --tune TRIALS`` adds one pass to the CPU pipeline, right after
operator fusion and before the default schedule rules (:class:`Tuner.pass_`).
It sees exactly the fused TIR functions the default rules would schedule and:

1. extracts them as MetaSchedule tasks and splits the TRIALS budget between
   them by FLOPs (estimated FLOPs x calls; largest remainder, so the shares sum
   to TRIALS);
2. tunes each task's missing trials with MetaSchedule (evolutionary search,
   xgboost cost model) into the database: a trial is only counted as spent
   once it is measured, so an interrupted run resumes where it stopped and a
   second run with the same budget measures nothing;
3. measures, once per task, the schedule graphopt's default rules give it (the
   *baseline*), and applies a task's best tuned record only when it measured
   faster than that baseline; everything else keeps the default rules. A tuned
   artifact is therefore never slower by construction than the default one
   (up to measurement noise);
4. records in the manifest the digest of the records applied: applying a
   database is deterministic, so the same model, options and database give a
   byte-identical ``main.so``.

The database is a folder (default ``$XDG_CACHE_HOME/graphopt/tuning``, else
``~/.cache/graphopt/tuning``; ``--tuning-db DIR`` overrides) holding one
MetaSchedule JSON database per target key (TVM version, LLVM cpu, triple, ISA
features, cores): a record tuned for AVX-512 is never applied to an AVX2
build. MetaSchedule appends every measured record as it comes, so a run
stopped by Ctrl-C leaves the records measured so far; a torn last line is
dropped when the database is next opened. An exclusive lock file serializes
runs on one target key. Next to MetaSchedule's two files, ``graphopt.json``
keeps graphopt's own book-keeping: trials spent per workload and the
baselines' times.

Tuning needs ``xgboost`` (MetaSchedule's cost model) and ``psutil`` (its worker
pools): the ``[tune]`` extra. Without them ``--tune`` is refused up front with
exit 2 and the ``pip install`` line (no silent fallback to a random model:
that would spend the user's budget on a much worse search).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from graphopt.errors import OptionError
from graphopt.signals import raise_if_interrupted

#: MetaSchedule's file names inside a target's folder.
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
#: graphopt's book-keeping beside them: trials spent per workload, baselines.
LEDGER = "graphopt.json"
LOCK = ".lock"
#: Candidates measured per search round (fewer when a task's share is smaller).
TRIALS_PER_ROUND = 16
#: Seconds a build or run worker may take. MetaSchedule starts fresh build workers for
#: every round, and each imports TVM first (10+ s on a busy 2-core machine): its
#: 30 s default timed every candidate out there.
WORKER_TIMEOUT_S = 300
#: Run-time of a failed candidate in MetaSchedule's records.
_FAILED = 1e9


def default_db_root() -> Path:
    """``$XDG_CACHE_HOME/graphopt/tuning``, else ``~/.cache/graphopt/tuning``."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return Path(base if base else Path.home() / ".cache") / "graphopt" / "tuning"


def check_trials(trials) -> int:
    """``trials`` as a non-negative int, or :class:`OptionError` (exit 2)."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise OptionError(f"--tune {trials!r}: the number of tuning trials must be an integer of at least 0 (0: no tuning)")
    return trials


def check_db_root(path: str | os.PathLike | None) -> Path:
    """The tuning database folder, created if missing; :class:`OptionError` when it cannot be used."""
    root = Path(path) if path is not None else default_db_root()
    what = f"--tuning-db {root}" if path is not None else f"tuning database {root}"
    if root.exists() and not root.is_dir():
        raise OptionError(f"{what}: is a file, not a folder; give a folder for the tuning database")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(f"{what}: cannot create the folder ({e.strerror or e}); give a writable folder") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise OptionError(f"{what}: the folder is not writable; give a writable folder")
    return root


def check_requirements() -> None:
    """Refuse tuning, with the install line, when the ``[tune]`` extra is missing."""
    missing = []
    for mod in ("xgboost", "psutil"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise OptionError(
            f"--tune needs {' and '.join(missing)} (MetaSchedule's cost model and worker pools), "
            "which are not installed: pip install 'graphopt[tune]'"
        )


def target_key(target) -> str:
    """A folder name that changes whenever a record could be wrong or slow for ``target``."""
    import tvm
    from tvm.target import codegen

    mcpu = str(target.attrs.get("mcpu", "generic"))
    ident = {
        "tvm": tvm.__version__,
        "kind": str(target.kind.name),
        "mcpu": mcpu,
        "triple": str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple(),
        "features": sorted(str(f) for f in codegen.llvm_get_cpu_features(target)),
        "cores": int(target.attrs.get("num-cores", 0)),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in mcpu)
    return f"llvm-{safe}-c{ident['cores']}-{digest}"


def split_budget(trials: int, weights: list[float]) -> list[int]:
    """``trials`` split in proportion to ``weights`` (largest remainder: the shares sum to ``trials``)."""
    total = sum(weights)
    if trials <= 0 or total <= 0:
        return [0] * len(weights)
    exact = [trials * w / total for w in weights]
    shares = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: trials - sum(shares)]:
        shares[i] += 1
    return shares


# --------------------------------------------------------------------------- the database folder


def _repair(folder: Path) -> list[str]:
    """Make MetaSchedule's files loadable after an interrupted write; returns notes of what was dropped.

    Records are independent lines: a torn or unreadable one is dropped. The
    workload table is positional (records refer to line numbers), so only a
    torn *last* line can go; anything else is refused rather than guessed.
    """
    notes = []
    wpath, rpath = folder / WORKLOADS, folder / RECORDS
    n_workloads = 0
    if wpath.exists():
        text = wpath.read_bytes()
        lines = text.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        good = []
        for i, line in enumerate(complete):
            try:
                json.loads(line)
                good.append(line)
            except ValueError:
                if i == len(complete) - 1 and not tail:
                    notes.append("dropped a torn workload line")
                    break
                raise OptionError(f"{wpath}: line {i + 1} is not valid JSON: the tuning database is damaged; "
                                  "remove the folder (or point --tuning-db elsewhere)") from None
        if tail:
            notes.append("dropped a torn workload line")
        if len(good) != len(complete) or tail:
            _rewrite(wpath, good)
        n_workloads = len(good)
    if rpath.exists():
        lines = rpath.read_bytes().split(b"\n")
        good, dropped = [], 0
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ok = i < len(lines) - 1 and isinstance(rec, list) and len(rec) == 2 and 0 <= int(rec[0]) < n_workloads
            except (ValueError, TypeError):
                ok = False
            if ok:
                good.append(line)
            else:
                dropped += 1
        if dropped:
            notes.append(f"dropped {dropped} torn or unreadable record line(s)")
            _rewrite(rpath, good)
    return notes


def _rewrite(path: Path, lines: list[bytes]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(b"".join(line + b"\n" for line in lines))
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(folder: Path, on_wait=None):
    """Hold an exclusive lock on ``folder`` (a lock file; blocks, calling ``on_wait`` once, while another run holds it)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock (documented)
        yield
        return
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _quick_frame_stacks():
    """``inspect.stack()`` without its source lookups, for as long as the block runs.

    Why: creating the first MetaSchedule ``TuneContext`` imports TVM's tensor
    intrinsics, ~500 TVMScript functions, each of which calls ``inspect.stack()``;
    with the modules of a graphopt process loaded, every frame's
    ``inspect.getmodule`` scans ``sys.modules``, and that import took 108 s of a
    2-trial tuning run on 2 cores (2.8 s with this). TVMScript reads only each
    frame's locals and the source line of the innermost three frames (a
    decorator inside a class), which are kept.
    """
    import inspect
    import linecache

    real = inspect.stack

    def stack(context: int = 1):
        frames, f = [], sys._getframe(1)
        while f is not None:
            line = linecache.getline(f.f_code.co_filename, f.f_lineno) if len(frames) < 3 else ""
            frames.append(inspect.FrameInfo(f, f.f_code.co_filename, f.f_lineno, f.f_code.co_name,
                                            [line] if line else None, 0 if line else None))
            f = f.f_back
        return frames

    inspect.stack = stack
    try:
        yield
    finally:
        inspect.stack = real


def import_tensor_intrinsics() -> None:
    """Import TVM's tensor intrinsics (what ``TuneContext`` and every builder worker import first) quickly.

    Also the builder workers' initializer: MetaSchedule restarts them for every
    build, and each spent ~30 s in this import (see :func:`_quick_frame_stacks`).
    """
    with _quick_frame_stacks():
        import tvm.s_tir.tensor_intrin  # noqa: F401


@contextlib.contextmanager
def _watch_sigint(seen: list):
    """Note in ``seen`` when SIGINT arrives (then act as before: KeyboardInterrupt); main thread only."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if previous == signal.SIG_IGN:
            return
        seen.append(signum)
        if callable(previous):
            previous(signum, frame)
        raise KeyboardInterrupt()

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _load_ledger(folder: Path) -> dict:
    try:
        doc = json.loads((folder / LEDGER).read_text(encoding="utf-8"))
        if isinstance(doc, dict):
            return {"spent": dict(doc.get("spent", {})), "baselines": dict(doc.get("baselines", {}))}
    except (OSError, ValueError):
        pass
    return {"spent": {}, "baselines": {}}


def _save_ledger(folder: Path, ledger: dict) -> None:
    tmp = folder / f".{LEDGER}.tmp"
    tmp.write_text(json.dumps(ledger, sort_keys=True, indent=1), encoding="utf-8")
    os.replace(tmp, folder / LEDGER)


def _shash(mod) -> str:
    from tvm_ffi import structural_hash

    return str(structural_hash(mod))


def _mean_secs(run_secs) -> float:
    vals = [float(x) for x in run_secs] if run_secs is not None else []
    return sum(vals) / len(vals) if vals else float("inf")


# --------------------------------------------------------------------------- progress


class _Bar:
    """``trials done/total`` with an ETA on the progress stream (a terminal only), one line rewritten."""

    def __init__(self, progress, total: int):
        self.out = progress.stream if progress is not None and getattr(progress, "enabled", False) else None
        self.total, self.done, self.t0, self.task = total, 0, time.perf_counter(), ""

    def show(self, note: str = "") -> None:
        if self.out is None:
            return
        elapsed = time.perf_counter() - self.t0
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        eta = (f"ETA {_clock(elapsed / self.done * (self.total - self.done))}" if self.done else "ETA …")
        self.out.write(f"\r\033[K… tune [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} trials, "
                       f"{_clock(elapsed)} elapsed, {eta}  {note or self.task}")
        self.out.flush()

    def close(self, line: str, ok: bool = True) -> None:
        if self.out is not None:
            self.out.write(f"\r\033[K{'✓' if ok else '✗'} {line}\n")
            self.out.flush()


def _clock(secs: float) -> str:
    secs = int(round(secs))
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m" if secs >= 3600 else f"{secs // 60}m{secs % 60:02d}s"


# --------------------------------------------------------------------------- the tuner


class Tuner:
    """Tunes the fused functions of one lowering and applies the database; made before compiling.

    Construction validates everything that can be refused up front (trials,
    the database folder, the ``[tune]`` extra) as :class:`OptionError`, so a
    bad option fails before any work. :meth:`pass_` is the Relax module pass
    for the pipeline's after-fusion hook, placed before the default rules;
    :meth:`manifest` is what the artifact records once the pass has run.
    """

    def __init__(self, trials: int, db_root, target, *, threads: int, progress=None, log: list | None = None,
                 default_rules=None):
        self.trials = check_trials(trials)
        self.root = check_db_root(db_root)
        check_requirements()
        self.target = target
        self.key = target_key(target)
        self.folder = self.root / self.key
        self.threads = threads
        self.progress = progress
        self.log = log if log is not None else []
        self.default_rules = default_rules
        self.summary: dict = {}
        self.failure: BaseException | None = None

    # -- the pass -----------------------------------------------------------------------------
    def pass_(self):
        """A module pass: tune what the budget still allows, then apply the winning records."""
        import tvm

        @tvm.transform.module_pass(opt_level=0, name="graphopt.TuneAndApplyDatabase")
        def _pass(mod, _ctx):
            try:
                return self.run(mod)
            except BaseException as e:
                # TVM turns any exception leaving a pass (Ctrl-C included) into a RuntimeError;
                # keep the original so the target can re-raise it (see :meth:`reraise`).
                self.failure = e
                raise

        return _pass

    def reraise(self) -> None:
        """Re-raise the exception that stopped :meth:`pass_`, if any (a Ctrl-C stays a Ctrl-C)."""
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def run(self, mod):
        """Tune ``mod``'s fused functions and return it with the winning records applied."""
        from tvm.s_tir import meta_schedule as ms

        tasks, symbolic = [], 0
        for t in ms.relax_integration.extract_tasks(mod, self.target):
            func = t.dispatched[0]["main"]
            if func.attrs.get("tirx.is_scheduled", False):
                continue
            if not _is_static(func):
                # MetaSchedule measures on concrete arguments: a symbolic (dynamic batch)
                # kernel cannot be timed, so it keeps the default rules' schedule.
                self.log.append(f"tune: {t.task_name} has symbolic shapes; kept on the default schedule")
                symbolic += 1
                continue
            tasks.append(t)
        self.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        bar = None
        sigint: list = []
        with _watch_sigint(sigint), \
                _locked(self.folder, on_wait=lambda: self._note("waiting for another run to release the tuning database")):
            for note in _repair(self.folder):
                self.log.append(f"tuning database {self.folder}: {note}")
            ledger = _load_ledger(self.folder)
            db = ms.database.JSONDatabase(work_dir=str(self.folder), module_equality="structural")
            funcs = [t.dispatched[0] for t in tasks]
            hashes = [_shash(f) for f in funcs]
            flops = [_flops(f) * max(1, int(t.weight)) for f, t in zip(funcs, tasks)]
            shares = split_budget(self.trials, flops)
            need = [max(0, s - int(ledger["spent"].get(h, 0))) for s, h in zip(shares, hashes)]
            measured = 0
            box: list = []

            def get_tools() -> "_Tools":
                if not box:
                    box.append(_Tools(self.target, self.threads))
                return box[0]

            try:
                if sum(need):
                    bar = _Bar(self.progress, sum(need))
                    bar.show("starting the measuring workers")
                    tools = get_tools()
                    for i, (task, func, h) in enumerate(zip(tasks, funcs, hashes)):
                        if not need[i]:
                            continue
                        bar.task = f"task {i + 1}/{len(tasks)}: {task.task_name}"
                        bar.show()
                        done = tools.tune(task, func, need[i], db, bar, on_batch=lambda n, h=h: self._spend(ledger, h, n))
                        measured += done
                        # The task's share is spent even if the search ran out of new candidates early.
                        ledger["spent"][h] = max(int(ledger["spent"].get(h, 0)), shares[i])
                        _save_ledger(self.folder, ledger)
                applied, records = self._choose(tasks, funcs, hashes, db, ledger, get_tools, bar)
            except BaseException as e:
                if bar is not None:
                    bar.close(f"tune: stopped after {bar.done} trial(s); the records measured so far are kept in "
                              f"{self.folder}", ok=False)
                    bar = None
                # A Ctrl-C inside MetaSchedule's callbacks comes back from its C++ loop as a RuntimeError.
                raise_if_interrupted()
                if sigint and not isinstance(e, KeyboardInterrupt):
                    raise KeyboardInterrupt() from None
                raise
            finally:
                _save_ledger(self.folder, ledger)
                for tools in box:
                    tools.close()
        elapsed = time.perf_counter() - t0
        digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
        self.summary = {
            "trials": self.trials,
            "database": self.key,
            "database_digest": f"sha256:{digest}",
            "tasks": len(tasks),
            "tuned_tasks": len(records),
            "symbolic_tasks": symbolic,
        }
        line = (f"tune: {measured} trial(s) measured in {elapsed:.0f}s, {len(records)}/{len(tasks)} kernel(s) "
                f"use tuned records (database {self.folder})")
        if symbolic:
            line += (f"; {symbolic} kernel(s) with symbolic shapes (a dynamic batch) cannot be measured and keep "
                     "the default schedules: fix the shapes with --input-shape to tune them")
        self.log.append(line)
        if bar is not None:
            bar.close(line)
        if not applied:
            return mod
        import tvm
        from tvm import relax

        with applied:
            return relax.transform.MetaScheduleApplyDatabase()(mod)

    def manifest(self) -> dict:
        """The manifest's ``tuning`` entry: budget, database key and digest of the records applied."""
        return dict(self.summary)

    # -- pieces ---------------------------------------------------------------------------------
    def _note(self, text: str) -> None:
        self.log.append(text)
        out = self.progress.stream if self.progress is not None and getattr(self.progress, "enabled", False) else None
        if out is not None:
            out.write(f"\r\033[K… {text}")
            out.flush()

    def _spend(self, ledger: dict, h: str, n: int) -> None:
        ledger["spent"][h] = int(ledger["spent"].get(h, 0)) + n
        _save_ledger(self.folder, ledger)

    def _default_schedule(self, func):
        """``func`` as graphopt's default rules schedule it (unchanged when no rule claims it)."""
        import tvm
        from tvm.s_tir import dlight

        rules = self.default_rules() if self.default_rules is not None else []
        mod = tvm.IRModule({"main": func["main"]})
        if rules:
            with self.target:
                mod = dlight.ApplyDefaultSchedule(*rules)(mod)
        return mod

    def _choose(self, tasks, funcs, hashes, db, ledger, get_tools, bar):
        """The in-memory database of the records to apply, and their description for the digest.

        A task's best record is applied only when it measured faster than the
        task's default schedule; the baseline is measured (once per workload
        and default schedule, kept in the ledger) when a tuned record exists.
        """
        from tvm.s_tir import meta_schedule as ms

        chosen = ms.database.MemoryDatabase(module_equality="structural")
        described = []
        any_applied = False
        for task, func, h in zip(tasks, funcs, hashes):
            if not db.has_workload(func):
                continue
            rec = db.query_tuning_record(func, self.target, task.task_name)
            if rec is None:
                continue
            tuned = _mean_secs(rec.run_secs)
            if not tuned < _FAILED:
                continue
            default = self._default_schedule(func)
            dkey = _shash(default)
            base = ledger["baselines"].get(h, {}).get(dkey)
            if base is None:
                if bar is not None:
                    bar.show(f"measuring the default schedule of {task.task_name}")
                base = get_tools().measure(default, func)
                ledger["baselines"].setdefault(h, {})[dkey] = base
                _save_ledger(self.folder, ledger)
            if not tuned < base:
                self.log.append(f"tune: {task.task_name}: default schedule ({base * 1e6:.1f} us) beats the best "
                                f"tuned record ({tuned * 1e6:.1f} us); keeping the default")
                continue
            wl = chosen.commit_workload(func)
            chosen.commit_tuning_record(ms.database.TuningRecord(
                rec.trace, wl, rec.run_secs, rec.target, rec.args_info))
            any_applied = True
            described.append([h, str(rec.trace), [float(x) for x in rec.run_secs]])
        described.sort()
        return (chosen if any_applied else None), described


def _is_static(func) -> bool:
    """Whether every buffer parameter of ``func`` has a constant shape."""
    from tvm.s_tir import meta_schedule as ms

    try:
        infos = ms.arg_info.ArgInfo.from_prim_func(func)
    except Exception:  # an argument MetaSchedule cannot describe: it could not measure it either
        return False
    return all(isinstance(d, int) or hasattr(d, "value") for info in infos for d in getattr(info, "shape", ()))


def _flops(func) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return max(1.0, float(estimate_tir_flops(func)))
    except Exception:  # symbolic extents: estimate_tir_flops refuses them
        return 1.0


class _Tools:
    """MetaSchedule's builder, runner and cost model for one tuning session (worker processes included).

    The runner's worker runs measured code with the artifact's thread count
    (``TVM_NUM_THREADS`` in its environment). :meth:`close` ends every worker
    process this session started, also after Ctrl-C: MetaSchedule's own
    shutdown leaves them running when interrupted.
    """

    def __init__(self, target, threads: int):
        import psutil
        from tvm.s_tir import meta_schedule as ms

        self.target = target
        self._before = {p.pid for p in psutil.Process().children(recursive=True)}
        self._logger = logging.getLogger("graphopt.tuning.metaschedule")
        self._logger.propagate = False
        self._logger.setLevel(logging.WARNING)
        saved = os.environ.get("TVM_NUM_THREADS")
        os.environ["TVM_NUM_THREADS"] = str(threads)
        try:
            self.runner = ms.runner.LocalRunner(
                timeout_sec=WORKER_TIMEOUT_S,
                evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=3, min_repeat_ms=40))
        finally:
            if saved is None:
                os.environ.pop("TVM_NUM_THREADS", None)
            else:
                os.environ["TVM_NUM_THREADS"] = saved
        cores = os.cpu_count() or 1
        self.builder = ms.builder.LocalBuilder(max_workers=cores, timeout_sec=WORKER_TIMEOUT_S,
                                               initializer=import_tensor_intrinsics)
        self.cost_model = ms.cost_model.XGBModel(num_tuning_cores=cores)
        self.cores = cores

    def tune(self, task, func, trials: int, db, bar, on_batch) -> int:
        """Measure ``trials`` candidates of ``task`` into ``db``; returns how many were measured."""
        from tvm.ir.utils import derived_object
        from tvm.s_tir import meta_schedule as ms

        counted = [0]

        @derived_object
        class _Count(ms.measure_callback.PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
                n = len(measure_candidates)
                counted[0] += n
                bar.done += n
                bar.show()
                on_batch(n)

        # The evolutionary search's population scales with the budget: its default (512 candidates, each
        # sampled and scored by the cost model every round) costs minutes on 2 cores even for 2 trials,
        # while a budget of N trials never measures more than N of them.
        population = min(512, max(64, 8 * trials))
        strategy = ms.search_strategy.EvolutionarySearch(population_size=population,
                                                         init_min_unmeasured=min(50, population // 2))
        import_tensor_intrinsics()
        ctx = ms.TuneContext(mod=func, target=self.target, space_generator="post-order-apply",
                             search_strategy=strategy, task_name=task.task_name, logger=self._logger,
                             rand_state=0, num_threads=self.cores).clone()
        ms.tune_tasks(
            tasks=[ctx], task_weights=[1.0], work_dir=os.devnull, max_trials_global=trials,
            max_trials_per_task=trials, num_trials_per_iter=min(TRIALS_PER_ROUND, trials),
            builder=self.builder, runner=self.runner, database=db, cost_model=self.cost_model,
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), _Count()],
            task_scheduler=ms.task_scheduler.RoundRobin(),
        )
        return counted[0]

    def measure(self, mod, func) -> float:
        """Mean run time (seconds) of ``mod`` (a scheduled ``func``), as the tuning runner measures; inf if it fails."""
        from tvm.s_tir import meta_schedule as ms

        (built,) = self.builder.build([ms.builder.BuilderInput(mod, self.target)])
        if built.error_msg:
            return float("inf")
        try:
            (future,) = self.runner.run([ms.runner.RunnerInput(
                built.artifact_path, device_type="cpu", args_info=ms.arg_info.ArgInfo.from_prim_func(func["main"]))])
            result = future.result()
        finally:
            with contextlib.suppress(OSError):
                import shutil

                shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
        return float("inf") if result.error_msg else _mean_secs(result.run_secs)

    def close(self) -> None:
        import psutil

        with contextlib.suppress(Exception):
            self.runner.pool.shutdown()
        try:
            procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in self._before]
        except psutil.Error:
            return
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=5)
