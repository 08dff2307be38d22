"""What every stage may read about the build it is part of."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from toolchain.core.dataset import Dataset
from toolchain.core.feed import Signature, arrays, torch_args
from toolchain.core.qat import QatState


@dataclasses.dataclass(frozen=True)
class BuildContext:
    workdir: Path  # the (temporary) build folder; stages write their files here
    calibration: Dataset  # already cut to the profile's sample count
    input_shape: tuple[int, ...]  # batch 1, e.g. (1, 3, 224, 224)
    dynamic_batch: bool  # whether exports should keep the batch dimension dynamic
    threads: int
    progress: Callable[[str, int, int], None] = lambda label, done, total: None
    isa: str | None = None  # the deployment CPU's x86 instruction set (target profile), None for others
    # stages' shared work within a build
    cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    signature: Signature | None = (
        None  # every input's name, shape, dtype (None: one float input of input_shape)
    )
    # a fine-tuned QAT model's weights and ranges (`build --qat`): its quantization stage uses them
    qat: QatState | None = None

    def example(self) -> tuple:
        """The model's arguments for one batch-1 input, as torch tensors, for tracing and exporting."""
        return torch_args(self.calibration.x[:1])

    def sample_shapes(self) -> list[tuple[int, ...]]:
        """Each input's shape for one batch-1 input: what a MAC count sets an ONNX file's free
        dimensions to (as the check does with a validation input)."""
        return [a.shape for a in arrays(self.calibration.x[:1])]

    @property
    def several(self) -> bool:
        """The model takes several inputs (or a non-float one): batches are Feeds."""
        return self.signature is not None and not self.signature.plain
