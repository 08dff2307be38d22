"""A model's inputs: what it takes (:class:`Signature`) and a batch of them (an ndarray or a :class:`Feed`).

A model with one float input takes an ndarray ``(N, *shape)``, as image models always have. A
model with several inputs, or with an integer one (token ids, attention masks, lengths), takes a
:class:`Feed`: one array per input, in the model's order, batch first; a scalar input (a sample
rate) is one 0-d array for the whole batch. Slicing and ``len`` work the same on both, so data,
parity and timing code is written once; the helpers below turn either into what a runtime wants
(torch arguments, an ONNX Runtime feed).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Union

import numpy as np

FLOAT = "float32"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One input: its name (the model's), one sample's shape (batch excluded; () for a scalar), dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = FLOAT
    dynamic: tuple[int, ...] = ()  # sample axes (batch excluded) whose size may change: a sequence length
    scalar: bool = False  # no batch dimension: one value for the whole batch

    @property
    def integer(self) -> bool:
        return np.issubdtype(np.dtype(self.dtype), np.integer) or self.dtype == "bool"

    def batch1(self) -> tuple[int, ...]:
        return self.shape if self.scalar else (1, *self.shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.batch1()),
            "dtype": self.dtype,
            "dynamic_axes": [a + (0 if self.scalar else 1) for a in self.dynamic],
            "scalar": self.scalar,
        }


@dataclasses.dataclass(frozen=True)
class Feed:
    """A batch of a multi-input (or non-float) model's inputs: one array per input, batch first."""

    arrays: tuple[np.ndarray, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        if not any(a.ndim for a in self.arrays):
            raise ValueError("a Feed needs at least one batched (non-scalar) input")

    def __len__(self) -> int:
        return len(next(a for a in self.arrays if a.ndim))

    def __getitem__(self, idx) -> "Feed":
        return Feed(tuple(a[idx] if a.ndim else a for a in self.arrays), self.names)

    def __iter__(self) -> Iterator["Feed"]:
        return (self[i : i + 1] for i in range(len(self)))

    def tobytes(self) -> bytes:
        return b"".join(contiguous(a).tobytes() for a in self.arrays)


Batch = Union[np.ndarray, Feed]


@dataclasses.dataclass(frozen=True)
class Signature:
    """Every input a model takes, in order."""

    inputs: tuple[InputSpec, ...]

    @property
    def plain(self) -> bool:
        """One float input with a batch dimension: batches are plain ndarrays."""
        return len(self.inputs) == 1 and self.inputs[0].dtype == FLOAT and not self.inputs[0].scalar

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def first_shape(self) -> tuple[int, ...]:
        """The first batched input's batch-1 shape (``model.input_shape`` in report.json)."""
        return next(s for s in self.inputs if not s.scalar).batch1()

    def synthetic(self, n: int, seed: int = 0, integer_range: tuple[int, int] = (0, 2)) -> Batch:
        """``n`` random inputs: standard normal floats; integers uniform in ``integer_range`` [low, high)."""
        rng = np.random.default_rng(seed)
        arrays = []
        for s in self.inputs:
            shape = s.shape if s.scalar else (n, *s.shape)
            if s.integer:
                arrays.append(rng.integers(*integer_range, shape).astype(s.dtype))
            else:
                arrays.append(rng.standard_normal(shape, dtype=np.float32).astype(s.dtype))
        return arrays[0] if self.plain else Feed(tuple(arrays), self.names)

    def to_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.inputs]


def contiguous(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array of the same shape: a 0-d one (a scalar input) stays 0-d, where
    ``np.ascontiguousarray`` would make it 1-d."""
    return np.require(a, requirements="C")


def arrays(x: Batch) -> tuple[np.ndarray, ...]:
    return x.arrays if isinstance(x, Feed) else (x,)


def torch_args(x: Batch) -> tuple:
    """The model's positional arguments for a batch (contiguous tensors sharing no
    memory with ``x``'s views)."""
    import torch

    return tuple(torch.from_numpy(contiguous(a).copy()) for a in arrays(x))


def ort_feed(x: Batch, names: list[str]) -> dict[str, np.ndarray]:
    """An ONNX Runtime feed: a plain batch as float32 under the model's one input name, a Feed by position."""
    if isinstance(x, Feed):
        if len(names) != len(x.arrays):
            raise ValueError(
                f"the ONNX model takes {len(names)} inputs ({', '.join(names)}), the data has {len(x.arrays)}"
            )
        return {n: contiguous(a) for n, a in zip(names, x.arrays)}
    return {names[0]: np.ascontiguousarray(x, dtype=np.float32)}


def repeat_to(x: Batch, n: int) -> Batch:
    """``n`` samples, the batch's own repeated as often as needed."""
    if isinstance(x, Feed):
        return Feed(tuple(np.resize(a, (n, *a.shape[1:])) if a.ndim else a for a in x.arrays), x.names)
    return np.resize(x, (n, *x.shape[1:]))
