"""Build folders appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from toolchain.core.errors import ToolchainError


def check_output(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier build (it has no manifest.json)."""
    if out.exists() and not (out.is_dir() and (out / "manifest.json").exists()):
        raise ToolchainError(f"--out `{out}` exists and is not a toolchain build folder; choose another path")


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on any error it is removed."""
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(out), dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a build folder is an ordinary folder
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(out: Path) -> None:
    """Remove what a build of ``out`` that was killed (SIGKILL: no cleanup) left beside it: its
    half-written temporary folder."""
    for p in out.parent.glob(_partial_prefix(out) + "*"):
        shutil.rmtree(p, ignore_errors=True)


def _partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"
