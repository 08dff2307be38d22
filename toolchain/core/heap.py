"""Python's cyclic garbage collector during a build.

A build imports torch, its exporters and ONNX: millions of objects that live as long as the
process. Each full collection walks all of them (about 0.25 s on a 2-core host once torch.export
and onnxscript are loaded), and a build runs dozens, automatic and explicit (before each peak
memory reading): a fifth of a small build's time. Inside :func:`long_lived`, what is alive when it
starts and what survives each :func:`collect` is moved to the collector's permanent generation
(``gc.freeze``), so later collections walk only what is new since. Reference counting still frees
frozen objects; only reference cycles among them wait until the build returns, when everything
is handed back to the collector (``gc.unfreeze``)."""

from __future__ import annotations

import contextlib
import functools
import gc

_depth = 0


@contextlib.contextmanager
def long_lived_heap():
    global _depth
    _depth += 1
    gc.freeze()
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()


def keeps_heap_frozen(fn):
    """Run ``fn`` inside :func:`long_lived_heap` (the build, bench and sensitivity entry points)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with long_lived_heap():
            return fn(*args, **kwargs)

    return wrapper


def collect() -> None:
    """A full collection; inside :func:`long_lived_heap` its survivors are frozen, so the next one
    walks only what was allocated since."""
    gc.collect()
    if _depth:
        gc.freeze()
