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
def native_stderr():
    """Capture what native code logs: to file descriptor 2, or through Python's ``sys.stderr``
    (ExecuTorch's Python bindings route the runtime's log there). The list holds the lines
    after exit."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    python_side = io.StringIO()
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                with contextlib.redirect_stderr(python_side):
                    yield lines
            finally:
                ctypes.CDLL(None).fflush(None)  # C stdio buffers, so the lines land in the sink
                os.dup2(saved, 2)
                sink.seek(0)
                lines.extend(sink.read().decode(errors="replace").splitlines())
                lines.extend(python_side.getvalue().splitlines())
    finally:
        os.close(saved)
