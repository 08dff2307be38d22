"""What every stage may read about the build it is part of."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from .data import Dataset


@dataclasses.dataclass(frozen=True)
class BuildContext:
    workdir: Path  # the (temporary) build folder; stages write their files here
    calibration: Dataset  # already cut to the profile's sample count
    input_shape: tuple[int, ...]  # batch 1, e.g. (1, 3, 224, 224)
    dynamic_batch: bool  # whether exports should keep the batch dimension dynamic
    threads: int
    progress: Callable[[str, int, int], None] = lambda label, done, total: None
    isa: str | None = None  # the deployment CPU's x86 instruction set (target profile), None for others
    cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # stages' shared work within a build

    def example(self):
        """One batch-1 input as a torch tensor, for tracing and exporting."""
        import torch

        return torch.from_numpy(self.calibration.x[:1].copy())
