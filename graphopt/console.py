"""Terminal progress and keeping libraries' own chatter off our output.

:class:`Progress` shows a live elapsed-time line on stderr for each long step
when stderr is a terminal, and nothing under ``--quiet`` or when piped.
:func:`capture_native_output` redirects file descriptors 1 and 2 (what C++
libraries and exporters print, which Python-level redirection cannot catch)
into a temporary file for the duration of a block; the text is kept so
``--debug`` can show it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import threading
import time
import warnings
from typing import Iterator


class Progress:
    """Step-by-step progress on stderr; silent unless enabled and stderr is a TTY."""

    def __init__(self, enabled: bool = True, stream=None):
        stream = stream or sys.stderr
        self.enabled = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.stream = stream
        if self.enabled and stream is sys.stderr:
            # A private copy of the terminal: capture_native_output() redirects fd 2
            # during compilation, and progress must still reach the user.
            with contextlib.suppress(OSError, ValueError):
                self.stream = os.fdopen(os.dup(stream.fileno()), "w", buffering=1, encoding="utf-8")

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        done = threading.Event()
        t0 = time.perf_counter()
        out = self.stream

        def tick():
            # Only steps that last more than a second get a live line.
            if done.wait(1.0):
                return
            while not done.wait(0.25):
                out.write(f"\r\033[K… {label} ({time.perf_counter() - t0:.1f}s)")
                out.flush()

        th = threading.Thread(target=tick, daemon=True)
        th.start()
        ok = False
        try:
            yield
            ok = True
        finally:
            done.set()
            th.join()
            mark = "✓" if ok else "✗"
            out.write(f"\r\033[K{mark} {label} ({time.perf_counter() - t0:.1f}s)\n")
            out.flush()


def step(progress: "Progress | None", label: str):
    """``progress.step(label)``, or a no-op context when there is no progress display."""
    return progress.step(label) if progress is not None else contextlib.nullcontext()


class NativeLog:
    """Text captured from file descriptors 1 and 2."""

    def __init__(self):
        self.text = ""


@contextlib.contextmanager
def capture_native_output() -> Iterator[NativeLog]:
    """Send fd 1/2 output (and Python warnings) of the block to a buffer."""
    log = NativeLog()
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    saved = []
    py_out = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as sink, warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(py_out), contextlib.redirect_stderr(py_out):
        warnings.simplefilter("always")
        try:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
            yield log
        finally:
            for s in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    s.flush()
            for fd, dup in saved:
                os.dup2(dup, fd)
                os.close(dup)
            sink.seek(0)
            log.text = py_out.getvalue() + sink.read().decode("utf-8", "replace") + "".join(
                f"{w.category.__name__}: {w.message}\n" for w in caught
            )
