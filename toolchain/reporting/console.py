"""What a build shows on the terminal while it runs.

The library only logs (``logging.getLogger("toolchain")``) and reports counts through a
``progress(label, done, total)`` callback; this module turns both into what a person reads:

- on a terminal: one live line with a spinner and the current step (a bar with counts where
  the step has a count), and each warning printed above it, marked and coloured;
- elsewhere (a pipe, CI, ``--json``): plain lines, a count only when its step is done.

Libraries' own log records and Python warnings stay out unless ``--verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator

LIBRARY_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnxruntime", "executorch", "torchao", "root")


class _LiveHandler(logging.Handler):
    """Info records become the live line's step; warnings and errors are printed above it."""

    def __init__(self, live) -> None:
        super().__init__()
        self.live = live

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.live.warn(message, record.levelno >= logging.ERROR)
        else:
            self.live.step(message)


class _PlainHandler(logging.StreamHandler):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


class _Live:
    """A rich progress display with one line: a spinner and the current step, and a bar with
    counts while the step has a count."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.text import Text

        class CountBar(BarColumn):  # nothing at all for a step without a count (no pulsing bar)
            def render(self, task):
                return Text("") if task.total is None else super().render(task)

        self.console = Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            CountBar(bar_width=24),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task("starting", total=None, count="")

    def step(self, message: str) -> None:
        self._task(None)
        self.progress.update(self.task, description=_escape(message))

    def count(self, label: str, done: int, total: int) -> None:
        self._task(total)
        self.progress.update(self.task, description=_escape(label), completed=done, count=f"{done}/{total}")

    def _task(self, total: int | None) -> None:
        """A new task where the kind of step changes (rich cannot set a task's total back to None)."""
        if self.progress.tasks[0].total != total:
            self.progress.remove_task(self.task)
            self.task = self.progress.add_task("", total=total, count="")

    def warn(self, message: str, error: bool = False) -> None:
        mark = "[bold red]✖ error:[/]" if error else "[bold yellow]⚠ warning:[/]"
        self.console.print(f"{mark} {_escape(message)}", highlight=False)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class Terminal:
    """Set up once per command: logging, warnings filters, and the progress callback."""

    def __init__(self, quiet: bool = False, verbose: bool = False, plain: bool = False) -> None:
        self.quiet, self.verbose = quiet, verbose
        self.plain = plain or not sys.stderr.isatty()
        self._live: _Live | None = None

    def configure(self) -> None:
        logger = logging.getLogger("toolchain")
        logger.handlers.clear()
        logger.propagate = False
        logger.setLevel(logging.ERROR if self.quiet else (logging.DEBUG if self.verbose else logging.INFO))
        if not self.verbose:
            # deprecation notices of torch.ao / TorchScript: the choices are deliberate and documented per
            # stage
            warnings.filterwarnings("ignore")
            for name in LIBRARY_LOGGERS:
                logging.getLogger(None if name == "root" else name).setLevel(logging.ERROR)
        else:
            logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
        self._handler = _PlainHandler(sys.stderr)
        logger.addHandler(self._handler)

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        """While a long command runs: the live line on a terminal, plain lines elsewhere."""
        if self.plain or self.quiet:
            yield
            return
        logger = logging.getLogger("toolchain")
        self._live = _Live()
        handler = _LiveHandler(self._live)
        logger.removeHandler(self._handler)
        logger.addHandler(handler)
        try:
            with self._live.progress:
                yield
        finally:
            logger.removeHandler(handler)
            logger.addHandler(self._handler)
            self._live = None

    def progress(self, label: str, done: int, total: int) -> None:
        """The ``progress`` callback of :func:`toolchain.build`."""
        if self.quiet:
            return
        if self._live is not None:
            self._live.count(label, done, total)
        elif done == total:
            print(f"{label}: {total} samples", file=sys.stderr)
