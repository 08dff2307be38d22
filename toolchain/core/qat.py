"""A fine-tuned quantization-aware model's state, as `toolchain qat` writes it and `toolchain build
--qat` reads it: the weights it learned and the ranges its fake-quantization held, with what they
were prepared for (target, artifact, the quantization stage and its settings).

The file is a plain ``torch.save`` dictionary of tensors, strings and numbers, read with
``weights_only=True``: a state file from elsewhere cannot run code when it is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from toolchain.core.errors import ToolchainError, reason

FORMAT = "toolchain.qat"
VERSION = 1


class QatError(ToolchainError):
    """A QAT state file that is missing, damaged, or was prepared for another target or model."""


@dataclasses.dataclass(frozen=True)
class QatState:
    target: str  # the target profile's name it was prepared for
    artifact: str  # the artifact whose quantization it matches
    stage: str  # that artifact's quantization stage
    settings: dict[str, Any]  # the stage's quantization settings it was prepared with
    model_sha256: str  # the FP32 model it was prepared from (toolchain.core.artifact's hash)
    state_dict: dict[str, Any] = dataclasses.field(repr=False, compare=False)
    source: str = ""  # the file it was read from
    sha256: str | None = None  # that file's, as read: a build's input, as the model is

    def to_json(self) -> dict[str, Any]:
        """What a report records of it."""
        return {
            "file": self.source,
            "sha256": self.sha256,
            "artifact": self.artifact,
            "stage": self.stage,
            "settings": self.settings,
        }


def write_qat_state(state: QatState, path: str | Path) -> Path:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": FORMAT,
            "version": VERSION,
            "target": state.target,
            "artifact": state.artifact,
            "stage": state.stage,
            "settings": dict(state.settings),
            "model_sha256": state.model_sha256,
            "state_dict": {k: v.detach().cpu() for k, v in state.state_dict.items()},
        },
        path,
    )
    return path


def read_qat_state(path: str | Path) -> QatState:
    import hashlib
    import io
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise QatError(f"QAT state `{path}` does not exist")
    data = path.read_bytes()  # hashed and loaded from the same bytes
    try:
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError):
        raw = None  # torch's own message (a zip's missing data.pkl) says less than what follows
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise QatError(
            f"`{path}` is not a QAT state written by `toolchain qat` or `toolchain.qat.save` (another kind "
            "of file, or damaged; a model file goes before the options, the fine-tuned state after --qat)"
        )
    if raw.get("version") != VERSION:
        raise QatError(f"QAT state `{path}` has version {raw.get('version')}; this toolchain reads {VERSION}")
    kinds = {
        "target": str,
        "artifact": str,
        "stage": str,
        "settings": dict,
        "model_sha256": str,
        "state_dict": dict,
    }
    wrong = [k for k, kind in kinds.items() if not isinstance(raw.get(k), kind)]
    tensors = not wrong and all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())
    if wrong or not tensors:
        raise QatError(
            f"QAT state `{path}` is damaged: {', '.join(wrong) or 'state_dict'} missing or malformed"
        )
    return QatState(
        raw["target"],
        raw["artifact"],
        raw["stage"],
        dict(raw["settings"]),
        raw["model_sha256"],
        raw["state_dict"],
        str(path.resolve()),  # a report names it; `toolchain sensitivity` reads it again from anywhere
        hashlib.sha256(data).hexdigest(),
    )


def load_into(model, state: QatState, stage: str) -> None:
    """``state``'s weights and ranges into ``model`` (the QAT model a stage rebuilt from the build's
    model); one StageError when they do not fit it."""
    from toolchain.core.errors import StageError

    try:
        model.load_state_dict(state.state_dict)
    except RuntimeError as e:
        raise StageError(
            f"{stage}: the QAT state {state.source} does not fit this model "
            f"({reason(e, limit=200)}): prepare it from the model file this build reads"
        ) from None
