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


@contextlib.contextmanager
def orderly_unwind(signals=SIGNALS) -> Iterator[None]:
    """Within the block, the first of ``signals`` raises :class:`Interrupted`; later ones are ignored.

    Only the main thread can install handlers; elsewhere this is a no-op.
    The previous handlers are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list[int] = []

    def handler(signum, frame):
        if hit:
            return  # already unwinding: let the clean-up finish
        hit.append(signum)
        raise Interrupted(signum)

    saved = {}
    try:
        for s in signals:
            saved[s] = signal.signal(s, handler)
        yield
    finally:
        for s, old in saved.items():
            signal.signal(s, old)
