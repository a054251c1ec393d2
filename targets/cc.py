"""Compiling graphopt's C kernels (``targets/*.c``) into object files that ``export_library`` links into main.so."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from graphopt.errors import LoweringError


def compiler() -> str:
    """The C compiler ``export_library`` links with (``$CC``, else cc, gcc, clang); LoweringError if none."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise LoweringError("graphopt's native kernels need a C compiler (cc, gcc or clang; or $CC), "
                            "as linking main.so does")
    return cc


def compile_object(source: Path, scratch: Path, flags: tuple = ()) -> Path:
    """Compile ``source`` into ``scratch/<stem>.o`` with ``-O3 -fPIC`` and ``flags``; returns the object file.

    The bytes depend only on the source, the flags and the compiler (no -g, no timestamps), so artifacts
    stay reproducible. A compiler failure is a LoweringError carrying its first error line.
    """
    out = scratch / (source.stem + ".o")
    res = subprocess.run([compiler(), "-O3", "-fPIC", *flags, "-c", str(source), "-o", str(out)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        first = next((ln for ln in res.stderr.splitlines() if "error" in ln), res.stderr.strip()[:200])
        raise LoweringError(f"compiling graphopt's kernel {source.name} failed: {first}")
    return out
