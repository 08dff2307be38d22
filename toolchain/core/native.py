"""Native code and process-wide torch settings: silencing what C libraries print, and giving a
library caller its torch settings back."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import sys
import tempfile


def keeps_torch_settings(fn):
    """Stages and runtimes set torch's process-wide quantized engine and thread count for the
    artifact at hand; a library caller gets its own back when the call returns, however it ends."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            import torch
        except ImportError:  # a device image without torch (TensorRT engines only): nothing to keep
            return fn(*args, **kwargs)
        engine, threads = torch.backends.quantized.engine, torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.backends.quantized.engine = engine
            torch.set_num_threads(threads)

    return wrapper


@contextlib.contextmanager
def native_stderr_off():
    """Silence what native code writes to file descriptor 2 (Python's own errors still raise)."""
    with native_stderr() as _:
        yield


@contextlib.contextmanager
def native_stderr(stdout: bool = False):
    """Capture what native code logs: to file descriptor 2, or through Python's ``sys.stderr``
    (ExecuTorch's Python bindings route the runtime's log there), and with ``stdout`` file
    descriptor 1 too (the TorchScript exporter's C++ log). The list holds the lines after exit."""
    lines: list[str] = []
    python_side = io.StringIO()
    with tempfile.TemporaryFile() as sink:
        try:
            with (
                _redirected(1, sink.fileno()) if stdout else contextlib.nullcontext(),
                _redirected(2, sink.fileno()),
                contextlib.redirect_stderr(python_side),
            ):
                yield lines
        finally:
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())
            lines.extend(python_side.getvalue().splitlines())


@contextlib.contextmanager
def stdout_to_stderr():
    """File descriptor 1 is file descriptor 2 while the block runs: what native libraries (the QNN
    SDK announces its thread-local configuration there) and Python's ``print`` write to standard
    output lands with the log on standard error, so that standard output carries only what a
    command prints after the block: its table, or its JSON."""
    with _redirected(1, 2):
        yield


@contextlib.contextmanager
def _redirected(fd: int, to: int):
    """File descriptor ``fd`` (1 or 2) points where ``to`` does while the block runs. Python's stream
    and C's stdio buffers are flushed on both sides of the switch, so nothing written before lands
    after it, or the other way round."""
    stream = sys.stdout if fd == 1 else sys.stderr
    stream.flush()
    saved = os.dup(fd)
    try:
        os.dup2(to, fd)
        try:
            yield
        finally:
            stream.flush()
            ctypes.CDLL(None).fflush(None)
            os.dup2(saved, fd)
    finally:
        os.close(saved)
