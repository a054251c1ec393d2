"""Atomic file and directory output, and the one place where writing errors become user errors.

Outputs are written next to their destination under a temporary name and moved
into place with ``os.replace`` only once complete, so a failed or interrupted
run never leaves a half-written file or artifact behind.

Any ``OSError`` while writing an output (read-only or full file system, a
parent that is a file, a name too long, no permission) is the user's
environment, not a bug: it becomes an :class:`~graphopt.errors.OutputError`
(exit 2) whose one-line message names the output path, here and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError
from .signals import raise_if_interrupted


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _describe(e: OSError) -> str:
    what = e.strerror or type(e).__name__
    name = os.path.basename(str(e.filename or ""))
    if not name or (name.startswith(".") and name.endswith(".tmp")):  # our own temp name says nothing
        return what
    return f"{what} ('{e.filename}')"


@contextlib.contextmanager
def output_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block into an :class:`OutputError` that names ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"{path}: cannot write this output: {_describe(e)}; "
                          "choose another path or make room/permission there") from e


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = next((p for p in (path.parent, *path.parent.parents) if os.path.lexists(p) and not p.is_dir()),
                       None)
        if blocker is None:
            raise
        raise OutputError(f"{path}: cannot write this output: '{blocker}' is a file, not a folder; "
                          "choose another path") from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then rename).

    With ``overwrite=False`` an existing ``path`` is never replaced: the file is
    published with ``os.link``, which fails if the name exists, and that is an
    :class:`OutputError`.
    """
    path = Path(path)
    with output_errors(path):
        _make_parent(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs follow the umask
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            raise_if_interrupted()
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise OutputError(f"{path}: exists already; graphopt does not overwrite it "
                                      "(remove it or write elsewhere)") from None
                os.unlink(tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace_if=None) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block succeeds.

    If ``path`` already exists it is replaced only when ``replace_if(path)`` is
    true (for example: it is an artifact graphopt wrote); otherwise the caller
    must have refused earlier. On any exception (and on an interrupt) the
    temporary directory is removed and ``path`` is left as it was. An
    ``OSError`` from creating, filling or publishing the directory is an
    :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    with output_errors(path):
        _make_parent(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent))
        old = None
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            yield tmp
            raise_if_interrupted()
            if path.exists():
                if replace_if is None or not replace_if(path):
                    raise FileExistsError(path)
                old = Path(tempfile.mkdtemp(prefix=f".{path.name[:200]}.", suffix=".old", dir=path.parent))
                os.replace(path, old / "x")
                os.replace(tmp, path)
            else:
                os.replace(tmp, path)
        except BaseException:
            # Interrupted between the two renames: put the previous artifact back.
            if old is not None and os.path.lexists(old / "x") and not os.path.lexists(path):
                os.replace(old / "x", path)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def private_tempdir(path: str | os.PathLike) -> Iterator[Path]:
    """Make ``path`` (created here, removed afterwards) the process's temporary folder for the block.

    Libraries that write temporary files under the system temp dir (TVM's
    ``tempdir()`` and ``export_library``, and the C compiler it runs) then
    write them inside graphopt's own temporary output folder, so they go with
    it on failure or interrupt instead of piling up in ``/tmp``. Sets both
    ``tempfile.tempdir`` (this process) and ``TMPDIR`` (child processes).
    """
    path = Path(path)
    path.mkdir(mode=0o700)
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(path)
    os.environ["TMPDIR"] = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(path, ignore_errors=True)
