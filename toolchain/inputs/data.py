"""Calibration and validation inputs: `.npy`, `.npz` (`x`, optional labels `y`), image folders,
or synthetic inputs when the user gives none."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np

from toolchain.core.dataset import Dataset
from toolchain.core.errors import DataError
from toolchain.core.feed import Feed, Signature, contiguous
from toolchain.core.options import option

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"}


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
    """How a folder of images becomes model inputs (arrays are used as they are)."""

    resize: int = option(256, "resize the shorter image side to this many pixels")
    crop: int = option(224, "then center-crop a square of this many pixels")
    mean: tuple[float, ...] = option(
        (0.485, 0.456, 0.406), "per-channel mean subtracted after scaling to [0, 1]"
    )
    std: tuple[float, ...] = option((0.229, 0.224, 0.225), "per-channel standard deviation divided by")
    grayscale: bool = option(False, "convert images to one channel")


def load_dataset(
    path: Path,
    role: str,
    preprocess: PreprocessOptions,
    limit: int | None = None,
    seed: int = 0,
    inputs: tuple[str, ...] | None = None,
    constants: tuple[str, ...] = (),
) -> Dataset:
    """Read up to ``limit`` inputs for ``role`` ("calibration" or "validation") and check them.

    Arrays are cut to their first ``limit`` samples (their order is the user's); an image
    folder is sampled per class, in turn, in an order fixed by ``seed``, so every class is in.
    ``inputs``: the names of a model's several (or non-float) inputs: an `.npz` with one array
    per name, read as a :class:`Feed`; its other arrays are labels, but for ``constants`` (the
    model's fixed non-tensor arguments, read by constants.py).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{role} data `{path}` does not exist")
    if inputs:
        return _read_feed(path, role, inputs, limit, constants)
    if path.is_dir():
        x, y = _read_image_folder(path, role, preprocess, limit, seed)
        labels = {} if y is None else {"y": y}
    elif path.suffix in (".npy", ".npz"):
        x, labels = _read_array_file(path, role)
        labels = {k: v for k, v in labels.items() if k not in constants}
        _no_scalar_labels(labels, path, role, ("x",))
        x, labels = x[:limit], {k: v[:limit] for k, v in labels.items()}
    else:
        raise DataError(f"{role} data `{path}` must be a .npy or .npz file or a folder of images")
    return _checked(x, labels, str(path), role)


def _no_scalar_labels(labels: dict[str, np.ndarray], path: Path, role: str, inputs) -> None:
    """A 0-d array is one value for the whole file (a sample rate), never a label: the model must take it."""
    for name, a in labels.items():
        if a.ndim == 0:
            raise DataError(
                f"{role} data `{path}`: `{name}` is a single value (a 0-d array), but the model has no "
                f"argument `{name}` to give it to (its inputs: {', '.join(inputs)}); remove it from the file"
            )


def synthetic_dataset(sample_shape: tuple[int, ...], count: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(rng.standard_normal((count, *sample_shape), dtype=np.float32), None, "synthetic")


def _read_feed(
    path: Path, role: str, names: tuple[str, ...], limit: int | None, constants: tuple[str, ...] = ()
) -> Dataset:
    """An `.npz` holding one array per model input (a 0-d array for a scalar input) and labels."""
    if path.suffix != ".npz" or path.is_dir():
        raise DataError(
            f"{role} data `{path}`: the model takes inputs {', '.join(names)}; give an .npz with one array "
            f"per input name (and optional labels `y`)"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{role} data `{path}` cannot be read: {e}") from None
    with loaded:
        files = list(loaded.files)
        missing = [n for n in names if n not in files]
        if missing:
            raise DataError(
                f"{role} data `{path}` has no array {', '.join(f'`{n}`' for n in missing)}: the model takes "
                f"inputs {', '.join(names)}, one array per name (found {', '.join(files) or 'nothing'})"
            )
        arrays = [loaded[n] for n in names]
        labels = {n: loaded[n] for n in files if n not in names and n not in constants}
        _no_scalar_labels(labels, path, role, names)
        labels = {n: a[:limit] for n, a in labels.items()}
    batched = [a for a in arrays if a.ndim]
    if not batched or len(batched[0]) == 0:
        raise DataError(f"{role} data `{path}` is empty: need arrays of shape (N, ...) with N >= 1")
    count = len(batched[0])
    for n, a in zip(names, arrays):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise DataError(f"{role} data `{path}`: input `{n}` must be numeric (got dtype {a.dtype})")
        if a.ndim and len(a) != count:
            raise DataError(f"{role} data `{path}`: input `{n}` has {len(a)} samples, `{names[0]}` {count}")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise DataError(f"{role} data `{path}`: input `{n}` has NaN or infinite values")
    arrays = [
        (a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a)[:limit] if a.ndim else a
        for a in arrays
    ]
    x = Feed(tuple(contiguous(a) for a in arrays), names)
    for name, a in labels.items():
        if a.ndim == 0 or len(a) != len(x):
            raise DataError(
                f"{role} labels `{name}` in `{path}` must have one entry per sample, {len(x)} "
                f"(got shape {a.shape})"
            )
    return Dataset(x, class_labels(labels.get("y")), str(path), labels=labels)


def check_signature(data: Dataset, signature: Signature, role: str) -> Dataset:
    """``data`` as the model takes it: each input's sample shape checked (dynamic
    axes may differ), dtype cast."""
    if signature.plain:
        check_sample_shape(data, signature.inputs[0].shape, role)
        return data
    arrays = []
    for spec, a in zip(signature.inputs, data.x.arrays):
        got = a.shape if spec.scalar else a.shape[1:]
        fixed = [i for i in range(len(spec.shape)) if i not in spec.dynamic]
        if len(got) != len(spec.shape) or any(got[i] != spec.shape[i] for i in fixed):
            what = "a scalar" if spec.scalar else f"{_fmt(spec.shape) or 'one value'} per sample"
            raise DataError(
                f"{role} data `{data.origin}`: input `{spec.name}` has shape {_fmt(got) or '()'}"
                f"{'' if spec.scalar else ' per sample'}, the model takes {what}"
            )
        if spec.integer and np.issubdtype(a.dtype, np.floating):
            raise DataError(
                f"{role} data `{data.origin}`: input `{spec.name}` holds floats, the model takes {spec.dtype}"
            )
        arrays.append(contiguous(a.astype(spec.dtype, copy=False)))
    return dataclasses.replace(data, x=Feed(tuple(arrays), signature.names))


def check_sample_shape(data: Dataset, sample_shape: tuple[int, ...], role: str) -> None:
    if isinstance(data.x, Feed):
        raise DataError(
            f"{role} data `{data.origin}` holds several inputs "
            f"({', '.join(data.x.names)}); the model takes one"
        )
    if tuple(data.x.shape[1:]) != tuple(sample_shape):
        raise DataError(
            f"{role} data `{data.origin}` has samples of shape {_fmt(data.x.shape[1:])}, "
            f"but the model input is {_fmt(sample_shape)} (batch dimension excluded)"
        )


def _fmt(shape) -> str:
    return "x".join(map(str, shape))


def _read_array_file(path: Path, role: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{role} data `{path}` cannot be read: {e}") from None
    if isinstance(loaded, np.ndarray):
        return loaded, {}
    with loaded:
        names = list(loaded.files)
        key = "x" if "x" in names else (names[0] if len(names) == 1 else None)
        if key is None:
            raise DataError(
                f"{role} data `{path}` must hold an array `x` (and optionally `y`); "
                f"found {', '.join(names) or 'nothing'}"
            )
        return loaded[key], {n: loaded[n] for n in names if n != key}


def _read_image_folder(
    path: Path, role: str, pre: PreprocessOptions, limit: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{role} data `{path}` holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    classes = sorted({p.parent.relative_to(path).as_posix() for p in files})
    _check_layout(path, role, classes)
    labelled = classes != ["."]
    files = _per_class_sample(files, path, limit, seed)
    xs, ys = [], []
    for p in files:
        try:
            with Image.open(p) as img:
                xs.append(_preprocess(img, pre))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{role} image `{p}` cannot be decoded: {e}") from None
        ys.append(classes.index(p.parent.relative_to(path).as_posix()))
    return np.stack(xs), (np.asarray(ys) if labelled else None)


def _check_layout(path: Path, role: str, classes: list[str]) -> None:
    """Images directly in the folder (unlabelled) or one folder per class (ImageNet style), nothing else."""
    nested = next((c for c in classes if "/" in c), None)
    mixed = "." in classes and len(classes) > 1
    if nested or mixed:
        where = (
            f"images two folders deep (`{nested}/`)"
            if nested
            else "images both in the folder itself and in sub-folders"
        )
        raise DataError(
            f"{role} data `{path}` has {where}; lay it out as `{path}/<class>/<image>` (one folder per "
            f"class, labels from the folder names) or put every image directly in `{path}` (no labels)"
        )


def _per_class_sample(files: list[Path], root: Path, limit: int | None, seed: int) -> list[Path]:
    """Up to ``limit`` files, taking each class in turn, in a shuffled order fixed by ``seed``."""
    if limit is None or limit >= len(files):
        return files
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[Path]] = {}
    for p in files:
        by_class.setdefault(p.parent.relative_to(root).as_posix(), []).append(p)
    queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_class.items())]
    picked: list[Path] = []
    while len(picked) < limit:
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop())
    return sorted(picked)


def _preprocess(img, pre: PreprocessOptions) -> np.ndarray:
    img = img.convert("L" if pre.grayscale else "RGB")
    w, h = img.size
    scale = pre.resize / min(w, h)
    img = img.resize((max(pre.crop, round(w * scale)), max(pre.crop, round(h * scale))))
    w, h = img.size
    left, top = (w - pre.crop) // 2, (h - pre.crop) // 2
    img = img.crop((left, top, left + pre.crop, top + pre.crop))
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    channels = a.shape[0]
    mean = np.asarray(pre.mean[:channels], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.std[:channels], dtype=np.float32).reshape(-1, 1, 1)
    return (a - mean) / std


def _checked(x: np.ndarray, labels: dict[str, np.ndarray], origin: str, role: str) -> Dataset:
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{role} data `{origin}` must be numeric (got dtype {x.dtype})")
    if x.ndim < 2 or len(x) == 0:
        raise DataError(f"{role} data `{origin}` is empty: need an array of shape (N, ...) with N >= 1")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise DataError(f"{role} data `{origin}` has NaN or infinite values in {bad} of {len(x)} samples")
    for name, a in labels.items():
        if a.ndim == 0 or len(a) != len(x):
            raise DataError(
                f"{role} labels `{name}` in `{origin}` must have one entry per sample, {len(x)} "
                f"(got shape {a.shape})"
            )
    return Dataset(np.ascontiguousarray(x), class_labels(labels.get("y")), origin, labels=labels)


def class_labels(y: np.ndarray | None) -> np.ndarray | None:
    """`y` as class labels: integers (or whole numbers stored as floats), one per sample or one per
    frame (N, T); None otherwise (a regression target stays a label for the metric alone). Whether
    they fit an output is the verdict's to say (toolchain.verdict.parity)."""
    if y is None or y.ndim not in (1, 2):
        return None
    if np.issubdtype(y.dtype, np.integer):
        return y
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and np.all(y == np.round(y)):
        return y.astype(np.int64)
    return None


@dataclasses.dataclass(frozen=True)
class DataOptions:
    calibration_samples: int = option(256, "calibration inputs used (the first N of --calib)")
    validation_samples: int = option(512, "validation inputs used for parity (the first N of --val)")
    synthetic_samples: int = option(64, "inputs generated when no data is given (parity marked synthetic)")
    integer_range: tuple[int, ...] = option(
        (0, 2),
        "[low, high): synthetic integer inputs (token ids, masks) are drawn from "
        "it; give the vocabulary size for token ids, e.g. [0, 30522]",
    )
    preprocess: PreprocessOptions = option(PreprocessOptions(), "image-folder preprocessing")
