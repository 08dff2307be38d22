"""Calibration and validation data: formats, and refusals of bad data."""

import numpy as np
import pytest
from PIL import Image

from toolchain.core.errors import DataError
from toolchain.inputs.data import PreprocessOptions, check_sample_shape, load_dataset

PRE = PreprocessOptions()


def test_npz_with_labels_and_npy(tmp_path):
    x = np.random.rand(5, 1, 8, 8).astype(np.float64)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(5))
    d = load_dataset(tmp_path / "d.npz", "validation", PRE)
    assert d.x.dtype == np.float32 and d.y.tolist() == [0, 1, 2, 3, 4]
    np.save(tmp_path / "d.npy", x)
    assert load_dataset(tmp_path / "d.npy", "calibration", PRE).y is None


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros((0, 3, 4, 4), np.float32), "is empty"),
        (np.array([[np.nan, 1.0], [1.0, 2.0]], np.float32), "NaN or infinite values in 1 of 2 samples"),
        (np.array([[np.inf, 1.0]], np.float32), "NaN or infinite"),
    ],
)
def test_bad_arrays(tmp_path, x, message):
    np.save(tmp_path / "bad.npy", x)
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path / "bad.npy", "calibration", PRE)


def test_labels_must_match(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2), np.float32), y=np.arange(3))
    with pytest.raises(DataError, match="labels `y`.* must have one entry per sample, 4"):
        load_dataset(tmp_path / "d.npz", "validation", PRE)


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "none.npz", "calibration", PRE)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="cannot be read"):
        load_dataset(tmp_path / "broken.npz", "calibration", PRE)


def test_wrong_sample_shape_names_both_shapes(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((2, 3, 8, 8), np.float32))
    d = load_dataset(tmp_path / "d.npy", "calibration", PRE)
    with pytest.raises(DataError, match="samples of shape 3x8x8, but the model input is 1x8x8"):
        check_sample_shape(d, (1, 8, 8), "calibration")


def test_image_folder_with_class_subfolders(tmp_path):
    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), colour).save(tmp_path / cls / f"{i}.png")
    d = load_dataset(tmp_path, "validation", PreprocessOptions(resize=20, crop=16))
    assert d.x.shape == (4, 3, 16, 16) and d.y.tolist() == [0, 0, 1, 1]
    red = (1.0 - 0.485) / 0.229
    assert np.allclose(d.x[0, 0], red, atol=1e-5)


def test_folder_without_images(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(tmp_path, "calibration", PRE)


def _images(folder, classes, per_class):
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(folder / c / f"{i:03d}.png")


def test_image_folder_is_sampled_per_class(tmp_path):
    """The first N files by path would all be `a`'s; a per-class sample has every class."""
    _images(tmp_path / "imgs", ["a", "b", "c"], 10)
    pre = PreprocessOptions(resize=8, crop=8)
    d = load_dataset(tmp_path / "imgs", "calibration", pre, limit=6)
    assert sorted(d.y.tolist()) == [0, 0, 1, 1, 2, 2]
    again = load_dataset(tmp_path / "imgs", "calibration", pre, limit=6)
    assert np.array_equal(d.x, again.x)  # a fixed seed: the same sample every time


def test_nested_image_folders_are_refused_with_the_layout(tmp_path):
    _images(tmp_path / "imgs", ["train/cat", "train/dog"], 2)
    with pytest.raises(
        DataError, match=r"images two folders deep \(`train/cat/`\); lay it out as `.*imgs/<class>/<image>`"
    ):
        load_dataset(tmp_path / "imgs", "calibration", PRE)


def test_hold_out_and_overlap(tmp_path):
    from toolchain.core.dataset import Dataset

    d = Dataset(np.arange(40, dtype=np.float32).reshape(10, 4), np.arange(10), "x.npy")
    rest, held = d.hold_out(3)
    assert len(rest.x) == 7 and len(held.x) == 3 and held.held_out and not rest.held_out
    assert rest.overlap(held) == 0 and d.overlap(held) == 3
    assert sorted(rest.y.tolist() + held.y.tolist()) == list(range(10))
