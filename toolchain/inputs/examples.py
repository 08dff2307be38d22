"""A small real model for the demo and the tests: a CNN trained on scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def digits_data(seed: int = 0):
    """(x_train, y_train, x_test, y_test): 8x8 digit images scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(
        x, digits.target.astype(np.int64), test_size=0.33, random_state=seed, stratify=digits.target
    )


def digits_cnn(classes: int = 10):
    """The example CNN for 8x8 digits, with ``classes`` logits (other heads reuse its body)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )


def train(model, x: np.ndarray | tuple, y: np.ndarray | None, epochs: int = 15, seed: int = 0, loss=None):
    """Seeded and single-threaded: the same model every run on the same kind of CPU (a
    multithreaded reduction sums in a different order each run). ``loss(outputs, batch_indices)``
    replaces cross-entropy against ``y``. ``x``: a tuple of arrays for a model of several inputs."""
    import torch

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        xs = tuple(torch.from_numpy(a) for a in (x if isinstance(x, tuple) else (x,)))
        yt = None if y is None else torch.from_numpy(y)
        model.train()
        loss = loss or (lambda out, idx: torch.nn.functional.cross_entropy(out, yt[idx]))
        for _ in range(epochs):
            for idx in torch.randperm(len(xs[0])).split(64):
                opt.zero_grad()
                loss(model(*(t[idx] for t in xs)), idx).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def digits_rgb(x: np.ndarray, size: int = 32) -> np.ndarray:
    """Digits as the 3-channel, ``size`` x ``size``, [-1, 1] images ImageNet-style models take."""
    import torch

    t = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False
    )
    return ((t - 0.5) / 0.5).repeat(1, 3, 1, 1).numpy()


def train_torchvision(name: str, x: np.ndarray, y: np.ndarray, epochs: int = 4):
    """A torchvision architecture (10 classes) trained on ``x`` from scratch.

    BatchNorm statistics are re-estimated over ``x`` after training: MobileNetV3's BatchNorm
    momentum (0.01) leaves running statistics far from the final weights' after a few epochs.
    """
    import torch
    import torchvision

    from toolchain.inputs.load import estimate_batchnorm

    torch.manual_seed(0)  # the initial weights too
    model = train(getattr(torchvision.models, name)(num_classes=10), x, y, epochs=epochs)
    estimate_batchnorm(model, x)
    return model


def write_digits_example(out: str | Path) -> dict[str, Path]:
    """Train the digits CNN and write `digits_cnn.pt2`, `calib.npz` and `val.npz` (with labels)."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x_train, x_test, y_train, y_test = digits_data()
    torch.manual_seed(0)  # the initial weights too
    model = train(digits_cnn(), x_train, y_train)
    example = torch.from_numpy(x_train[:2])
    ep = torch.export.export(
        model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},)
    )
    paths = {"model": out / "digits_cnn.pt2", "calibration": out / "calib.npz", "validation": out / "val.npz"}
    torch.export.save(ep, str(paths["model"]))
    np.savez(paths["calibration"], x=x_train[:256])
    np.savez(paths["validation"], x=x_test, y=y_test)
    return paths
