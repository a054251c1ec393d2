"""SIGTERM and SIGHUP become an orderly unwind, like Ctrl-C.

A build system stops a job with SIGTERM, a closed terminal sends SIGHUP; by
default either kills the process on the spot, leaving half-written outputs
(``.name.*.tmp`` folders) and the temporary files of TVM and the C compiler.
Inside :func:`orderly_unwind` the first such signal raises :class:`Interrupted`
in the main thread instead, so every ``finally``/``except BaseException``
clean-up runs (atomic outputs roll back, temp folders go) and the CLI exits
with 128 + the signal number after printing "interrupted". Further signals
during the unwind are ignored so that the clean-up itself is not cut short.

:class:`Interrupted` derives from :class:`KeyboardInterrupt`: code that turns
a plugin's stray ``BaseException`` into an error (everything but a user's
Ctrl-C) lets it through the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

#: The signals turned into :class:`Interrupted` (SIGINT already raises KeyboardInterrupt).
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by ``signum``; the exit code is ``128 + signum``."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


#: Signals received inside the current :func:`orderly_unwind` block (at most one is acted on).
_pending: list[int] = []


def pending() -> int | None:
    """The signal that asked this run to stop, or None."""
    return _pending[0] if _pending else None


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal arrived; called before an output is published.

    A signal handler runs wherever Python happens to be: inside a callback from
    C++ (TVM's passes call Python), the exception it raises can be converted
    into a library error or swallowed. Checking before every publish makes sure
    no output appears after a stop request, whatever the library did.
    """
    if _pending:
        raise Interrupted(_pending[0])


def _in_finalizer(frame, depth: int = 8) -> bool:
    """Whether ``frame`` (or one of its callers, a few levels up) is a ``__del__`` method."""
    while frame is not None and depth > 0:
        if frame.f_code.co_name == "__del__":
            return True
        frame, depth = frame.f_back, depth - 1
    return False


@contextlib.contextmanager
def orderly_unwind(signals=SIGNALS) -> Iterator[None]:
    """Within the block, the first of ``signals`` raises :class:`Interrupted`; later ones are ignored.

    Whatever leaves the block after such a signal (a library error that wrapped
    the interrupt, or nothing at all because a library swallowed it) becomes
    :class:`Interrupted`. Only the main thread can install handlers; elsewhere
    this is a no-op. The previous handlers are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _pending:
            return  # already unwinding: let the clean-up finish
        if _in_finalizer(frame):
            # An exception raised in __del__ is printed and dropped by Python: send the
            # signal again a moment later, when the finalizer has returned.
            t = threading.Timer(0.05, os.kill, (os.getpid(), signum))
            t.daemon = True
            t.start()
            return
        _pending.append(signum)
        raise Interrupted(signum)

    saved = {}
    try:
        for s in signals:
            saved[s] = signal.signal(s, handler)
        try:
            yield
        except Interrupted:
            raise
        except BaseException as e:
            if _pending:
                raise Interrupted(_pending[0]) from e
            raise
        if _pending:
            raise Interrupted(_pending[0])
    finally:
        for s, old in saved.items():
            signal.signal(s, old)
        _pending.clear()
