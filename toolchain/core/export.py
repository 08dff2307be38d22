"""torch.export for the stages that need an ExportedProgram (pt2e quantization, ExecuTorch)."""

from __future__ import annotations

import contextlib
import logging
import warnings

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.errors import StageError, reason


def as_module(artifact: Artifact):
    """A callable module for any in-memory PyTorch artifact (exported programs unwrapped)."""
    return artifact.model.module() if artifact.kind is Kind.EXPORTED else artifact.model


def export_program(model, example, stage: str, dynamic_batch: bool = False):
    """``torch.export`` ``model`` on ``example`` (a tensor, or a tuple of the model's arguments);
    with ``dynamic_batch`` the first dimension of every batched argument is left free (the example
    must then have a batch of at least 2).

    Raises StageError naming the stage and the first line of torch's reason.
    """
    import torch

    args = example if isinstance(example, tuple) else (example,)
    shapes = tuple({0: torch.export.Dim.AUTO} if a.dim() else None for a in args) if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, args, dynamic_shapes=shapes)
    except Exception as e:
        raise StageError(f"{stage}: torch.export failed: {reason(e)}") from None


@contextlib.contextmanager
def quiet_logger(name: str):
    """Raise logger ``name`` to ERROR for the duration: a library's notice at WARNING that concerns
    the library, not the user's build (torch's opset fallback note, torchao's pytree notice)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
