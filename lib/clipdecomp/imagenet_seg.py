"""ImageNet-segmentation: the 4,276 ImageNet images with object masks used for the paper's Table 3.

The masks come from Guillaumin, Küttel & Ferrari (IJCV 2014); Chefer et al. (2021) distribute them as
one MATLAB v7.3 file, ``gtsegs_ijcv.mat``, which is HDF5 and read here with h5py. Layout assumed
(the one the file has, and the one the tests' fixture writes):

* ``value/img``: an [n, 1] (or [1, n]) array of HDF5 object references, one per image. Each points
  to a uint8 dataset of shape [3, W, H]: MATLAB stores an H x W x 3 array column-major, so HDF5 sees
  the axes reversed. The loader transposes it back to [H, W, 3].
* ``value/gt``: the same for the masks, each [W, H] (transposed back to [H, W]); non-zero = object.

The referenced datasets sit in MATLAB's ``#refs#`` group; only the references are followed.

Mask handling. The model's preprocess resizes the shorter side and centre-crops. ``"aligned"``
(default) puts the mask through the same resize and crop (nearest neighbour), so mask and image
pixels correspond. ``"authors"`` reproduces the paper's code, which resizes the mask straight to the
square crop size: on non-square images it no longer lines up with the cropped image.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

__all__ = ["HOW_TO_GET", "ImageNetSegmentation", "MaskHandling", "align_mask", "square_mask"]

MaskHandling = Literal["aligned", "authors"]

HOW_TO_GET = (
    "ImageNet-segmentation is one file, gtsegs_ijcv.mat (Guillaumin et al., IJCV 2014, as distributed by "
    "Chefer et al. 2021). Download it from "
    "http://calvin-vision.net/bigstuff/proj-imagenet/data/gtsegs_ijcv.mat "
    "on a machine with internet access and pass its path (e.g. seg_path='/data/gtsegs_ijcv.mat')."
)

# Transforms that change pixel values but not geometry: the mask skips them.
_PHOTOMETRIC = (T.ToTensor, T.Normalize, T.ConvertImageDtype)
_PHOTOMETRIC_NAMES = ("MaybeToTensor", "MaybeConvertMode")  # open_clip's own, matched by name across versions


def _mask_image(mask: np.ndarray | torch.Tensor) -> Image.Image:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"A mask must be [H, W], got shape {array.shape}.")
    return Image.fromarray((array != 0).astype(np.uint8) * 255, mode="L")


def align_mask(mask: np.ndarray | torch.Tensor, preprocess: Callable) -> torch.Tensor:
    """Put a [H, W] mask through the geometric steps of an image preprocess (nearest neighbour): bool [S, S'].

    Supports torchvision ``Compose`` pipelines of ``Resize`` and ``CenterCrop`` plus photometric steps
    (open_clip's eval transform); anything else that might move pixels raises ``NotImplementedError``.
    """
    steps = getattr(preprocess, "transforms", None)
    if steps is None:
        raise NotImplementedError(
            f"Cannot align a mask with preprocess {preprocess!r}: expected a torchvision "
            "Compose (open_clip's eval transform). Use mask_handling='authors' instead."
        )
    image = _mask_image(mask)
    for step in steps:
        if isinstance(step, T.Resize):
            image = TF.resize(
                image, step.size, interpolation=T.InterpolationMode.NEAREST, max_size=step.max_size
            )
        elif isinstance(step, T.CenterCrop):
            image = TF.center_crop(image, step.size)
        elif not (
            isinstance(step, _PHOTOMETRIC)
            or type(step).__name__ in _PHOTOMETRIC_NAMES
            or inspect.isfunction(step)
        ):
            raise NotImplementedError(
                f"Cannot apply the preprocess step {step!r} to a mask; supported geometric "
                "steps: Resize, CenterCrop. Use mask_handling='authors' instead."
            )
    return torch.from_numpy(np.asarray(image) > 127)


def square_mask(mask: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The authors' mask handling: resize the whole [H, W] mask to ``size`` (nearest neighbour): bool."""
    image = TF.resize(_mask_image(mask), list(size), interpolation=T.InterpolationMode.NEAREST)
    return torch.from_numpy(np.asarray(image) > 127)


class ImageNetSegmentation:
    """Images and masks of ``gtsegs_ijcv.mat``, preprocessed for a model.

    ``dataset[i]`` -> (image [3, S, S'] from ``preprocess``, mask bool [S, S']); ``dataset.raw(i)`` ->
    (uint8 [H, W, 3], bool [H, W]) as stored. Use as a context manager (or call :meth:`close`) to
    release the file.

    Example:
        >>> with ImageNetSegmentation("gtsegs_ijcv.mat", bundle.preprocess) as data:  # doctest: +SKIP
        ...     images, masks = data.batch(range(8))
    """

    def __init__(self, path: str | Path, preprocess: Callable, mask_handling: MaskHandling = "aligned"):
        import h5py

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"ImageNet-segmentation file not found at {self.path}. {HOW_TO_GET}")
        if mask_handling not in ("aligned", "authors"):
            raise ValueError(
                f"mask_handling must be 'aligned' (mask cropped like the image) or 'authors' "
                f"(mask resized to the crop size, the paper's code), got {mask_handling!r}."
            )
        self.preprocess, self.mask_handling = preprocess, mask_handling
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as error:
            raise ValueError(
                f"{self.path} is not an HDF5 (MATLAB v7.3) file: {error}. {HOW_TO_GET}"
            ) from error
        if "value/img" not in self._file or "value/gt" not in self._file:
            self._file.close()
            raise ValueError(
                f"{self.path} lacks the datasets 'value/img' and 'value/gt' of gtsegs_ijcv.mat. {HOW_TO_GET}"
            )
        self._images = np.asarray(self._file["value/img"]).reshape(-1)
        self._masks = np.asarray(self._file["value/gt"]).reshape(-1)
        if len(self._images) != len(self._masks):
            raise ValueError(f"{self.path}: {len(self._images)} images but {len(self._masks)} masks.")

    def __len__(self) -> int:
        return len(self._images)

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image uint8 [H, W, 3] and mask bool [H, W] of item ``index`` as stored (axes put back)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images.")
        image = np.asarray(self._file[self._images[index]])
        image = np.repeat(image.T[..., None], 3, axis=-1) if image.ndim == 2 else image.transpose(2, 1, 0)
        mask = np.asarray(self._file[self._masks[index]]).T != 0
        if mask.shape != image.shape[:2]:
            raise ValueError(f"item {index}: image {image.shape[:2]} and mask {mask.shape} differ in size.")
        return np.ascontiguousarray(image, dtype=np.uint8), mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.raw(index)
        tensor = self.preprocess(Image.fromarray(image))
        if self.mask_handling == "aligned":
            target = align_mask(mask, self.preprocess)
        else:
            target = square_mask(mask, tuple(tensor.shape[-2:]))
        if tuple(target.shape) != tuple(tensor.shape[-2:]):
            raise ValueError(
                f"mask {tuple(target.shape)} does not match the preprocessed image "
                f"{tuple(tensor.shape[-2:])}; use mask_handling='authors'."
            )
        return tensor, target

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked images [n, 3, S, S'] and masks [n, S, S'] for ``indices``."""
        items = [self[int(i)] for i in indices]
        return torch.stack([image for image, _ in items]), torch.stack([mask for _, mask in items])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ImageNetSegmentation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
