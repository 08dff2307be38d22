"""Build folders appear whole or not at all."""

from __future__ import annotations

import contextlib
import logging
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


@contextlib.contextmanager
def build_log() -> Iterator[BuildLog]:
    """Everything the build logs while the block runs, debug lines and the full text of each stage's
    failure included, kept for the folder's `build.log` (:meth:`BuildLog.save`). What reached the
    terminal (or, for a library caller, the handlers above the `toolchain` logger) before still
    does, and nothing more: one short line per skipped artifact."""
    logger = logging.getLogger("toolchain")
    level, propagate, shown = logger.level, logger.propagate, logger.getEffectiveLevel()
    kept = BuildLog(shown)
    levels = {h: h.level for h in logger.handlers}  # each handler keeps what it let through before
    for h in levels:
        h.setLevel(max(h.level, shown))
    forward = _Forward(logger.parent, shown) if propagate and logger.parent else None
    if forward:
        logger.addHandler(forward)
        logger.propagate = False
    logger.addHandler(kept)
    logger.setLevel(logging.DEBUG)
    try:
        yield kept
    finally:
        for h in (kept, forward):
            if h:
                logger.removeHandler(h)
        logger.setLevel(level)
        logger.propagate = propagate
        for h, before in levels.items():
            h.setLevel(before)


class BuildLog(logging.Handler):
    """The lines of one build, in memory until the folder they belong in exists."""

    def __init__(self, shown: int) -> None:
        super().__init__(logging.DEBUG)
        self.shown = shown  # the level the terminal shows meanwhile
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def save(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")


class _Forward(logging.Handler):
    """Hands records at or above ``level`` to ``parent``'s handlers, as propagation did."""

    def __init__(self, parent: logging.Logger, level: int) -> None:
        super().__init__(level)
        self.parent = parent

    def emit(self, record: logging.LogRecord) -> None:
        self.parent.handle(record)


def terminal_level() -> int:
    """The lowest level the `toolchain` logger's records reach the terminal at (DEBUG with
    --verbose), a build's log aside."""
    logger = logging.getLogger("toolchain")
    kept = next((h for h in logger.handlers if isinstance(h, BuildLog)), None)
    return kept.shown if kept else logger.getEffectiveLevel()
