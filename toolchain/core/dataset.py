"""The calibration or validation samples a build runs on: the one data object stages see."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping

import numpy as np

from toolchain.core.feed import Feed


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Model inputs ``x`` (N, *sample_shape) as float32, or a :class:`Feed` of several;
    optional integer labels ``y``."""

    x: np.ndarray | Feed
    y: np.ndarray | None  # integer class labels (accuracy), when the data has them
    origin: str  # the file or folder, or "synthetic"
    held_out: bool = False  # validation samples set aside from the calibration data
    # every .npz array but `x`, one entry per sample
    labels: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def _pick(self, idx, **changes) -> "Dataset":
        return dataclasses.replace(
            self,
            x=self.x[idx],
            y=None if self.y is None else self.y[idx],
            labels={k: v[idx] for k, v in self.labels.items()},
            **changes,
        )

    @property
    def synthetic(self) -> bool:
        return self.origin == "synthetic"

    def take(self, n: int) -> "Dataset":
        return self._pick(slice(0, n))

    def spread(self, n: int) -> tuple["Dataset", np.ndarray]:
        """``n`` samples evenly spaced over the set (a file sorted by class keeps
        every class), and their indices."""
        idx = np.arange(n) * len(self.x) // n
        return self._pick(idx), idx

    def hold_out(self, n: int, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """(the rest, ``n`` samples drawn at random with ``seed``): disjoint
        calibration and validation sets."""
        order = np.random.default_rng(seed).permutation(len(self.x))
        keep, held = np.sort(order[n:]), np.sort(order[:n])
        return self._pick(keep), self._pick(held, held_out=True)

    def overlap(self, other: "Dataset") -> int:
        """How many of ``other``'s samples are byte-for-byte samples of this set."""
        mine = {_digest(s) for s in self.x}
        return sum(_digest(s) in mine for s in other.x)

    def batches(self, size: int):
        for i in range(0, len(self.x), size):
            yield self.x[i : i + size]


def _digest(sample) -> bytes:
    raw = sample.tobytes() if isinstance(sample, Feed) else np.ascontiguousarray(sample).tobytes()
    return hashlib.blake2b(raw, digest_size=16).digest()
