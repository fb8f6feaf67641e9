"""ImageNet-segmentation loader on a tiny file written here in the layout of gtsegs_ijcv.mat."""

from __future__ import annotations

import h5py
import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms as T
from clipdecomp.imagenet_seg import ImageNetSegmentation, align_mask, square_mask

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _item(height: int, width: int, box: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """A blue image with a red object exactly where its mask is."""
    mask = np.zeros((height, width), bool)
    mask[box] = True
    image = np.where(mask[..., None], np.array(RED, np.uint8), np.array(BLUE, np.uint8))
    return image.astype(np.uint8), mask


ITEMS = [
    _item(40, 60, (slice(5, 20), slice(2, 12))),  # wide: the object sits in the cropped-off left
    _item(36, 24, (slice(25, 34), slice(4, 20))),  # tall: the object sits in the cropped-off bottom
    _item(32, 32, (slice(8, 24), slice(8, 24))),
]


def write_fixture(path, items) -> None:
    """MATLAB v7.3 layout: value/img and value/gt hold [n, 1] references to arrays stored transposed."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        image_refs, mask_refs = [], []
        for i, (image, mask) in enumerate(items):
            image_refs.append(refs.create_dataset(f"img{i}", data=image.transpose(2, 1, 0)).ref)  # [3, W, H]
            mask_refs.append(refs.create_dataset(f"gt{i}", data=mask.T.astype(np.uint8)).ref)  # [W, H]
        value = f.create_group("value")
        value.create_dataset("img", data=np.array(image_refs, dtype=h5py.ref_dtype)[:, None])
        value.create_dataset("gt", data=np.array(mask_refs, dtype=h5py.ref_dtype)[:, None])


@pytest.fixture(scope="module")
def fixture_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("seg") / "gtsegs_ijcv.mat"
    write_fixture(path, ITEMS)
    return path


# Nearest-neighbour resizing for the image too, so that the red pixels mark the object exactly.
PLAIN = T.Compose([T.Resize(16, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(16), T.ToTensor()])


def _red(image: torch.Tensor) -> torch.Tensor:
    return image[0] > 0.5


def test_raw_items_round_trip(fixture_path):
    with ImageNetSegmentation(fixture_path, PLAIN) as data:
        assert len(data) == 3
        for i, (image, mask) in enumerate(ITEMS):
            raw_image, raw_mask = data.raw(i)
            assert raw_image.dtype == np.uint8 and np.array_equal(raw_image, image)
            assert raw_mask.dtype == bool and np.array_equal(raw_mask, mask)
        with pytest.raises(IndexError):
            data.raw(3)


def test_aligned_masks_are_cropped_like_the_images(fixture_path):
    with ImageNetSegmentation(fixture_path, PLAIN) as data:
        images, masks = data.batch(range(3))
    assert images.shape == (3, 3, 16, 16) and masks.shape == (3, 16, 16) and masks.dtype == torch.bool
    for image, mask in zip(images, masks):
        assert torch.equal(mask, _red(image))


def test_authors_masks_are_misaligned_on_non_square_images(fixture_path):
    with ImageNetSegmentation(fixture_path, PLAIN, mask_handling="authors") as data:
        for i in range(3):
            image, mask = data[i]
            assert mask.shape == (16, 16)
            assert torch.equal(mask, _red(image)) == (i == 2)  # only the square image lines up
            assert torch.equal(mask, square_mask(ITEMS[i][1], (16, 16)))


def test_align_mask_follows_open_clips_eval_transform():
    preprocess = open_clip.image_transform(24, is_train=False)
    image, mask = ITEMS[0]
    from PIL import Image

    tensor = preprocess(Image.fromarray(image))
    aligned = align_mask(mask, preprocess)
    assert aligned.shape == tensor.shape[-2:]
    red = tensor[0] > tensor[2]  # normalised, bicubic: compare channels
    assert (aligned == red).float().mean() > 0.95  # up to the bicubic edge pixels
    with pytest.raises(NotImplementedError, match="authors"):
        align_mask(mask, T.Compose([T.RandomRotation(10)]))


def test_missing_or_wrong_files_say_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="calvin-vision.net"):
        ImageNetSegmentation(tmp_path / "absent.mat", PLAIN)
    not_hdf5 = tmp_path / "old.mat"
    not_hdf5.write_bytes(b"MATLAB 5.0 MAT-file")
    with pytest.raises(ValueError, match="HDF5"):
        ImageNetSegmentation(not_hdf5, PLAIN)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ValueError, match="value/img"):
        ImageNetSegmentation(other, PLAIN)
    with pytest.raises(ValueError, match="mask_handling"):
        ImageNetSegmentation(other, PLAIN, mask_handling="resize")
