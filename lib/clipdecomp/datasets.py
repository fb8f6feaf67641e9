"""Image datasets that yield preprocessed tensors with labels that never depend on file order.

Three datasets share one small protocol (:class:`DecomposableDataset`) that
:class:`clipdecomp.cache.DecompositionCache` reads:

* :class:`ImageFolderDataset`: one folder per class (ImageNet-val style, ``root/<wnid>/<image>``).
* :class:`WaterbirdsDataset`: the Waterbirds release (``metadata.csv`` + images) of Sagawa et al.
* :class:`ToyDataset`: samples of the synthetic toy world (:mod:`clipdecomp.toy`) with exact attributes.

Tar shards in the webdataset format (LAION, DataComp, ...) are read as a stream instead, one shard
after another, by :class:`TarShardDataset` (protocol :class:`ShardedDataset`); a cache built from
them keeps one shard per tar file.

Each knows, up front, its per-image ``ids`` and ``labels`` (a dict of int arrays), loads image ``i``
with ``image(i)``, and describes its content with ``content_key()``, so a cache built from it can tell
when the data changed. For image files the key holds the dataset kind, root, preprocessing, and a
sha256 over the sorted relative paths with each file's size and modification time: cheap to compute
for 50,000 files (contents are not hashed), and any edited, added or removed file changes it; copying
the dataset elsewhere (new root or mtimes) also changes it, so a cache is rebuilt rather than trusted.

Files are checked once when a dataset is created: every image is decoded (JPEGs at reduced
resolution, about a millisecond each), and files that cannot be decoded are skipped, counted in
``skipped`` and named in one warning, or, with ``strict=True``, reported as an error. Checking up front
fixes the dataset's length and indices before any work starts, so a long run never meets a bad file
half-way. Grayscale, palette, CMYK and 16-bit images are converted to RGB; transparent images are
composited onto white, the way a viewer displays them.

Example:
    >>> from PIL import Image
    >>> for wnid in ("n01440764", "n01443537"):
    ...     (tmp_path / "val" / wnid).mkdir(parents=True)
    ...     Image.new("RGB", (32, 32)).save(tmp_path / "val" / wnid / "a.JPEG")
    >>> data = ImageFolderDataset(tmp_path / "val", bundle.preprocess, progress=False)
    >>> image, label = data[1]                 # [3, H, W], class index
    >>> data.classes[label], data.ids[1]
    ('n01443537', 'n01443537/a.JPEG')
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import warnings
from pathlib import Path
from typing import IO, Callable, Iterator, Literal, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image

from .checks import check_int, check_texts_list, read_utf8
from .progress import progress_bar

__all__ = [
    "DecomposableDataset",
    "ImageFolderDataset",
    "WaterbirdsDataset",
    "ToyDataset",
    "load_rgb",
    "describe_transform",
    "IMAGE_EXTENSIONS",
    "ShardedDataset",
    "TarShardDataset",
    "TarSample",
    "HOW_TO_GET_WATERBIRDS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
"""File endings (any case) read as images; other files in a dataset folder are ignored."""

HOW_TO_GET_WATERBIRDS = (
    "Waterbirds comes from the group-DRO release of Sagawa et al. (2020), 'Distributionally Robust "
    "Neural Networks' (github.com/kohpangwei/group_DRO): download the tarball "
    "waterbird_complete95_forest2water2.tar.gz (https://nlp.stanford.edu/data/dro/"
    "waterbird_complete95_forest2water2.tar.gz), extract it, and pass the extracted folder. Expected "
    "layout: <folder>/metadata.csv with columns img_filename, y, split, place (y: 0 landbird / 1 waterbird; "
    "split: 0 train / 1 val / 2 test; place: 0 land / 1 water) and each image at <folder>/<img_filename>, "
    "e.g. <folder>/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg."
)

IMAGEFOLDER_LAYOUT = (
    "Expected layout: one sub-folder per class holding that class's images, e.g. "
    "<root>/n01440764/ILSVRC2012_val_00000293.JPEG (ImageNet val as distributed is one flat folder: "
    "sort it into one folder per wnid first)."
)


@runtime_checkable
class DecomposableDataset(Protocol):
    """What :class:`~clipdecomp.cache.DecompositionCache` needs from a dataset.

    Attributes:
        labels: label name -> int array [n] (e.g. ``{"label": ...}``), known before any image is read.
        ids: one unique string per image (e.g. its path relative to the dataset root).
    """

    labels: dict[str, np.ndarray]
    ids: list[str]

    def __len__(self) -> int: ...

    def image(self, index: int) -> torch.Tensor:
        """The preprocessed image ``index`` as a [3, H, W] float tensor."""

    def content_key(self) -> dict:
        """A small JSON-able description that changes whenever the images or labels change."""


def load_rgb(path: str | Path | IO[bytes]) -> Image.Image:
    """Open an image file (or an open binary file) as 8-bit RGB: grayscale/palette/CMYK converted, 16-bit
    grayscale scaled (65535 -> 255), transparency composited on white."""
    with Image.open(path) as image:
        image.load()
        if image.mode.startswith("I"):  # 16/32-bit integer grayscale: map 16-bit range to 8 bits, not clip
            pixels = np.asarray(image, dtype=np.float64)
            if image.mode.startswith("I;16") or pixels.max() > 255:
                pixels = pixels / 257.0
            image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
        has_alpha = image.mode in ("RGBA", "LA", "RGBa", "La") or (
            image.mode == "P" and "transparency" in image.info
        )
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")


def describe_transform(transform) -> str:
    """repr of a preprocessing pipeline without memory addresses (``<function f at 0x...>``)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def _decode_error(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, or None. Reads the whole file (JPEGs decoded at 1/8 scale)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except Exception as error:  # PIL raises many types for bad files; the message is what matters
        return f"{type(error).__name__}: {error}"
    return None


def _check_files(
    root: Path, relpaths: list[str], strict: bool, progress: bool
) -> tuple[list[int], list[tuple[str, str]]]:
    """Indices of decodable files and (relative path, reason) of the others; strict -> raise on the first."""
    kept, skipped = [], []
    for index, rel in enumerate(progress_bar(relpaths, show=progress, desc="checking images", leave=False)):
        reason = _decode_error(root / rel)
        if reason is None:
            kept.append(index)
        elif strict:
            raise ValueError(
                f"Cannot read image {root / rel} ({reason}). Replace or delete the file, or pass "
                "strict=False to skip unreadable files."
            )
        else:
            skipped.append((rel, reason))
    if not kept:
        examples = "; ".join(f"{rel}: {reason}" for rel, reason in skipped[:3])
        raise ValueError(
            f"None of the {len(relpaths)} image files under {root} can be read ({examples}"
            f"{' ...' if len(skipped) > 3 else ''}). Check that they are whole image files (not partial "
            "downloads or Git LFS pointers) and that PIL can open them."
        )
    if skipped:
        names = ", ".join(rel for rel, _ in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        warnings.warn(
            f"Skipped {len(skipped)} unreadable image file(s) under {root}: {names}. See the dataset's "
            ".skipped for the reasons; pass strict=True to make this an error.",
            stacklevel=3,
        )
    return kept, skipped


def _listing_sha256(root: Path, relpaths: Sequence[str]) -> str:
    """sha256 over (relative path, size, mtime) of each file: cheap, and changes when any file does."""
    digest = hashlib.sha256()
    for rel in relpaths:
        stat = os.stat(root / rel)
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _labels_sha256(labels: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(labels):
        digest.update(name.encode() + np.ascontiguousarray(labels[name], dtype=np.int64).tobytes())
    return digest.hexdigest()


class _FileDataset(torch.utils.data.Dataset):
    """Images stored as files under ``root``; subclasses fill ``relpaths``, ``labels`` and ``kind``."""

    kind = "files"
    root: Path
    relpaths: list[str]
    labels: dict[str, np.ndarray]
    skipped: list[tuple[str, str]]

    def __init__(
        self,
        root: str | Path,
        preprocess: Callable[[Image.Image], torch.Tensor],
        what: str,
        how: str,
        strict: bool,
        progress: bool,
    ):
        """Check the arguments shared by file datasets; ``what``/``how`` name the dataset and its layout."""
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise TypeError(f"root must be the path of the {what}, got {root!r}.")
        if not callable(preprocess):
            raise TypeError(
                f"preprocess must turn a PIL image into a tensor (e.g. bundle.preprocess), got "
                f"{preprocess!r}."
            )
        for name, flag in (("strict", strict), ("progress", progress)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
        self.root, self.preprocess = Path(root).expanduser().resolve(), preprocess
        if not self.root.exists():
            raise FileNotFoundError(f"{what.capitalize()} {self.root} does not exist. {how}")
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root} is a file, not a folder: give the {what} itself. {how}")

    def _keep_readable(self, strict: bool, progress: bool) -> None:
        kept, self.skipped = _check_files(self.root, self.relpaths, strict, progress)
        self.relpaths = [self.relpaths[i] for i in kept]
        self.labels = {name: values[kept] for name, values in self.labels.items()}

    @property
    def ids(self) -> list[str]:
        """Each image's path relative to ``root`` (POSIX separators)."""
        return self.relpaths

    def __len__(self) -> int:
        return len(self.relpaths)

    def image(self, index: int) -> torch.Tensor:
        path = self.root / self.relpaths[index]
        try:
            picture = load_rgb(path)
        except Exception as error:
            raise ValueError(
                f"Cannot read image {path} ({type(error).__name__}: {error}); it was readable when "
                "the dataset was created, so it changed since: recreate the dataset."
            ) from error
        return self.preprocess(picture)

    def _selection_key(self) -> dict:
        return {
            "kind": self.kind,
            "root": str(self.root),
            "n_images": len(self.relpaths),
            "preprocess": describe_transform(self.preprocess),
            "files_sha256": _listing_sha256(self.root, self.relpaths),
            "labels_sha256": _labels_sha256(self.labels),
            "skipped": [rel for rel, _ in self.skipped],
        }


class ImageFolderDataset(_FileDataset):
    """Images in one sub-folder per class; label = the folder's index in ``classes``.

    Args:
        root: the folder holding one sub-folder per class.
        preprocess: PIL image -> [3, H, W] tensor, e.g. ``bundle.preprocess``.
        classes: folder names (e.g. ImageNet wnids) in class-index order. Default: the sorted folder
            names. Every class folder must appear in it; listed classes may be absent (a subset).
        strict: raise on an unreadable image instead of skipping it.
        progress: show a progress bar while checking the files.

    Labels: ``labels["label"]``; ``ids``: paths relative to ``root``, sorted by class folder then file name.
    """

    kind = "imagefolder"

    def __init__(
        self,
        root: str | Path,
        preprocess: Callable[[Image.Image], torch.Tensor],
        *,
        classes: Sequence[str] | None = None,
        strict: bool = False,
        progress: bool = True,
    ):
        super().__init__(root, preprocess, "image folder", IMAGEFOLDER_LAYOUT, strict, progress)
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            loose = [p.name for p in self.root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
            found = (
                f"found {len(loose)} images directly in it but no class folders"
                if loose
                else "it has no class folders"
            )
            raise ValueError(f"{self.root} is not an image-folder dataset: {found}. {IMAGEFOLDER_LAYOUT}")
        self.classes = folders if classes is None else check_texts_list("classes", classes)
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(
                "classes contains duplicate names; give each class folder once, in class-index order."
            )
        unknown = sorted(set(folders) - set(self.classes))
        if unknown:
            raise ValueError(
                f"Class folders {unknown[:5]}{' ...' if len(unknown) > 5 else ''} under {self.root} are "
                f"not in the given classes list ({len(self.classes)} names): pass the full list of "
                "folder names in class-index order, or remove the extra folders."
            )
        index_of = {name: i for i, name in enumerate(self.classes)}
        self.relpaths, labels = [], []
        for folder in folders:
            files = sorted(
                p.name
                for p in (self.root / folder).iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            self.relpaths += [f"{folder}/{name}" for name in files]
            labels += [index_of[folder]] * len(files)
        if not self.relpaths:
            raise ValueError(
                f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {self.root}. "
                f"{IMAGEFOLDER_LAYOUT}"
            )
        self.labels = {"label": np.asarray(labels, dtype=np.int64)}
        self._keep_readable(strict, progress)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.image(index), int(self.labels["label"][index])

    def content_key(self) -> dict:
        return {
            **self._selection_key(),
            "classes_sha256": hashlib.sha256("\n".join(self.classes).encode()).hexdigest(),
        }


class WaterbirdsDataset(_FileDataset):
    """The Waterbirds dataset (birds pasted on land or water backgrounds); see :data:`HOW_TO_GET_WATERBIRDS`.

    Args:
        root: the extracted ``waterbird_complete95_forest2water2`` folder (holds ``metadata.csv``).
        preprocess: PIL image -> [3, H, W] tensor.
        split: ``"train"``, ``"val"``, ``"test"`` (5,794 images) or ``"all"``.
        strict: raise on an unreadable image instead of skipping it.

    Items are ``(image, y, place, group)`` with ``y`` 0 landbird / 1 waterbird, ``place`` 0 land /
    1 water and ``group = 2 * y + place`` (names in :attr:`group_names`). Rows keep the order of
    ``metadata.csv``; ``ids`` are its ``img_filename`` values.
    """

    kind = "waterbirds"
    SPLITS = {"train": 0, "val": 1, "test": 2}
    class_names = ["landbird", "waterbird"]
    place_names = ["land", "water"]
    group_names = ["landbird on land", "landbird on water", "waterbird on land", "waterbird on water"]

    def __init__(
        self,
        root: str | Path,
        preprocess: Callable[[Image.Image], torch.Tensor],
        split: Literal["train", "val", "test", "all"] = "test",
        *,
        strict: bool = False,
        progress: bool = True,
    ):
        if split != "all" and split not in self.SPLITS:
            raise ValueError(f"split must be 'train', 'val', 'test' or 'all', got {split!r}.")
        super().__init__(root, preprocess, "Waterbirds folder", HOW_TO_GET_WATERBIRDS, strict, progress)
        self.split = split
        metadata = self.root / "metadata.csv"
        if not metadata.is_file():
            raise FileNotFoundError(
                f"{metadata} is missing: {self.root} is not an extracted Waterbirds folder. "
                f"{HOW_TO_GET_WATERBIRDS}"
            )
        rows = self._read_metadata(metadata)
        wanted = [r for r in rows if split == "all" or r["split"] == self.SPLITS[split]]
        if not wanted:
            raise ValueError(f"{metadata} has no rows with split={split!r}. {HOW_TO_GET_WATERBIRDS}")
        for row in wanted:  # metadata may only name files inside the dataset folder
            target = (self.root / row["img_filename"]).resolve()
            if target == self.root or not target.is_relative_to(self.root):
                raise ValueError(
                    f"{metadata} line {row['line']}: img_filename {row['img_filename']!r} points outside "
                    f"{self.root} (to {target}); every image must be a file inside the dataset folder."
                )
        missing = [r["img_filename"] for r in wanted if not (self.root / r["img_filename"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in {metadata} are missing, e.g. "
                f"{self.root / missing[0]}: the extraction is incomplete. {HOW_TO_GET_WATERBIRDS}"
            )
        self.metadata_sha256 = hashlib.sha256(metadata.read_bytes()).hexdigest()
        self.relpaths = [r["img_filename"] for r in wanted]
        y = np.array([r["y"] for r in wanted], dtype=np.int64)
        place = np.array([r["place"] for r in wanted], dtype=np.int64)
        self.labels = {"y": y, "place": place, "group": 2 * y + place}
        self._keep_readable(strict, progress)

    @staticmethod
    def _read_metadata(path: Path) -> list[dict]:
        with io.StringIO(read_utf8(path, "Waterbirds metadata file"), newline="") as handle:
            reader = csv.DictReader(handle)
            needed = {"img_filename", "y", "split", "place"}
            columns = set(reader.fieldnames or [])
            if not needed <= columns:
                raise ValueError(
                    f"{path} lacks the column(s) {sorted(needed - columns)} (has {sorted(columns)}). "
                    f"{HOW_TO_GET_WATERBIRDS}"
                )
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    parsed = {k: int(float(row[k])) for k in ("y", "split", "place")}
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{path} line {line}: y, split and place must be integers, got "
                        f"{[row.get(k) for k in ('y', 'split', 'place')]}. {HOW_TO_GET_WATERBIRDS}"
                    ) from None
                if (
                    parsed["y"] not in (0, 1)
                    or parsed["place"] not in (0, 1)
                    or parsed["split"] not in (0, 1, 2)
                ):
                    raise ValueError(
                        f"{path} line {line}: expected y, place in {{0, 1}} and split in {{0, 1, 2}}, "
                        f"got {parsed}. {HOW_TO_GET_WATERBIRDS}"
                    )
                if not (row["img_filename"] or "").strip():
                    raise ValueError(f"{path} line {line}: img_filename is empty. {HOW_TO_GET_WATERBIRDS}")
                rows.append({"img_filename": row["img_filename"], "line": line, **parsed})
        first_line: dict[str, int] = {}
        for row in rows:
            if row["img_filename"] in first_line:
                raise ValueError(
                    f"{path} lines {first_line[row['img_filename']]} and {row['line']} both list "
                    f"{row['img_filename']!r}: each image must appear once. {HOW_TO_GET_WATERBIRDS}"
                )
            first_line[row["img_filename"]] = row["line"]
        return rows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        return (self.image(index), *(int(self.labels[k][index]) for k in ("y", "place", "group")))

    def content_key(self) -> dict:
        return {**self._selection_key(), "split": self.split, "metadata_sha256": self.metadata_sha256}


class ToyDataset(torch.utils.data.Dataset):
    """``n`` toy-world samples (:func:`clipdecomp.toy.sample`), preprocessed, with every attribute as a label.

    Args:
        n: number of images.
        seed: sampling seed (the split name is mixed in, see :mod:`clipdecomp.toy`).
        preprocess: PIL image -> [3, H, W] tensor.
        split: ``"train"``, ``"val"``, ``"uniform"`` (independent attributes) or ``"test_groups"``.
        masks: also return each image's object mask (bool [64, 64]) from ``__getitem__``.

    ``labels`` holds every attribute of :data:`clipdecomp.toy.ATTRIBUTES` plus ``group = 2 * label + place``;
    ``__getitem__`` returns ``(image, {name: int})`` or ``(image, {name: int}, mask)``; ``samples`` keeps the
    raw :class:`~clipdecomp.toy.ToySamples` (uint8 images, masks, captions).
    """

    kind = "toy"

    def __init__(
        self,
        n: int,
        seed: int = 0,
        preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
        *,
        split: str = "uniform",
        masks: bool = False,
    ):
        from . import toy

        if preprocess is None or not callable(preprocess):
            raise TypeError("ToyDataset needs preprocess=bundle.preprocess (PIL image -> [3, H, W] tensor).")
        n, seed = check_int("n", n, minimum=1), check_int("seed", seed, minimum=0)
        if split not in toy.world.SPLITS:
            raise ValueError(f"split must be one of {', '.join(map(repr, toy.world.SPLITS))}; got {split!r}.")
        if not isinstance(masks, bool):
            raise TypeError(f"masks must be True or False, got {masks!r}.")
        self.n, self.seed, self.split, self.preprocess, self.return_masks = n, seed, split, preprocess, masks
        self.samples = toy.sample(n, seed, split=split)
        attributes = {k: np.asarray(v, dtype=np.int64) for k, v in self.samples.attributes.items()}
        self.labels = {**attributes, "group": 2 * attributes["label"] + attributes["place"]}
        self.ids = [f"toy/{split}/{seed}/{i}" for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def image(self, index: int) -> torch.Tensor:
        return self.preprocess(Image.fromarray(self.samples.images[index]))

    def __getitem__(self, index: int):
        labels = {name: int(values[index]) for name, values in self.labels.items()}
        if self.return_masks:
            return self.image(index), labels, torch.from_numpy(self.samples.masks[index])
        return self.image(index), labels

    def content_key(self) -> dict:
        pixels = hashlib.sha256(np.ascontiguousarray(self.samples.images).tobytes()).hexdigest()
        return {
            "kind": self.kind,
            "n_images": self.n,
            "seed": self.seed,
            "split": self.split,
            "preprocess": describe_transform(self.preprocess),
            "images_sha256": pixels,
            "labels_sha256": _labels_sha256(self.labels),
        }


class TarSample(NamedTuple):
    """One readable sample of a tar shard, as :meth:`TarShardDataset.samples` yields it."""

    image: torch.Tensor
    id: str  # "<shard name>/<__key__>"
    index: int  # position of the sample in its shard, counting the samples that were skipped
    labels: dict[str, int]
    captions: dict[str, str]


@runtime_checkable
class ShardedDataset(Protocol):
    """A dataset read as a stream of shards; :class:`~clipdecomp.cache.DecompositionCache` keeps one cache
    shard per dataset shard, so ranks can split the work by shard without random access.

    Attributes:
        shard_names: one stable name per shard (in order).
        label_names: the integer labels every sample has; caption_names: its texts.
    """

    shard_names: list[str]
    label_names: list[str]
    caption_names: list[str]

    def samples(self, shard: int, skipped: list | None = None) -> Iterator[TarSample]:
        """The readable samples of shard ``shard`` in order; ``(id, reason)`` of unreadable ones go to
        ``skipped``."""

    def content_key(self) -> dict:
        """A small JSON-able description that changes whenever a shard changes."""


class TarShardDataset(torch.utils.data.IterableDataset):
    """Webdataset tar shards (``data/{000000..000099}.tar``), streamed one shard at a time (``webdataset``).

    Args:
        shards: a brace pattern such as ``"data/{000000..000099}.tar"`` (expanded the way webdataset
            expands it) or a list of tar files. Local files only: their names, sizes and modification
            times make the content key of a cache built from them.
        preprocess: PIL image -> [3, H, W] tensor, e.g. ``bundle.preprocess``.
        labels: sidecar keys holding one integer each, e.g. ``["cls"]`` (``000123.cls`` holds ``7``); each
            becomes ``labels[key]``.
        captions: sidecar keys holding UTF-8 text, e.g. ``["txt"]``; each becomes ``captions[key]``.
        strict: raise on the first corrupt sample or unreadable tar instead of skipping it.

    A sample is the run of tar members sharing a ``__key__`` (``000123.jpg``, ``000123.cls``, ...). Its
    image is the member whose extension comes first in :data:`IMAGE_EXTENSIONS`; its id is
    ``"<shard name>/<__key__>"`` (shard names are paths relative to the shards' common folder), so ids are
    unique across shards and stable while the files are. Nothing is read up front (the files must
    exist); while streaming, a sample that has no image, an image that does not decode, a missing or
    non-integer
    label, a caption that is not UTF-8, a key repeated within a shard, and the unreadable rest of a
    truncated tar are skipped, counted and named in one warning per pass (or, ``strict``, raised).

    Iterating (``for sample in data``, or a DataLoader) yields :class:`TarSample` items shard after
    shard; under ``torch.distributed`` and in DataLoader workers each rank and worker reads its own
    shards (webdataset's ``split_by_node`` and ``split_by_worker``). The cache reads shard by shard
    with :meth:`samples`.

    Example::

        data = TarShardDataset("laion/{00000..00009}.tar", bundle.preprocess, captions=["txt"])
        cache = DecompositionCache.build(bundle, data, "caches/laion10")   # one cache shard per tar
        cache.captions["txt"][:2], cache.ids[:2]  # (['a dog on a beach', ...], ['00000.tar/000000017', ...])
    """

    kind = "wds"

    def __init__(
        self,
        shards: str | Sequence[str | Path],
        preprocess: Callable[[Image.Image], torch.Tensor],
        *,
        labels: Sequence[str] = (),
        captions: Sequence[str] = (),
        strict: bool = False,
    ):
        from webdataset.shardlists import expand_urls

        if not callable(preprocess):
            raise TypeError(
                f"preprocess must turn a PIL image into a tensor (e.g. bundle.preprocess), got "
                f"{preprocess!r}."
            )
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, got {strict!r}.")
        if isinstance(shards, (str, os.PathLike)):
            names = expand_urls(os.fspath(shards))
        elif isinstance(shards, Sequence) and not isinstance(shards, bytes):
            names = [os.fspath(name) for name in shards]
        else:
            raise TypeError(
                f"shards must be a brace pattern such as 'data/{{000000..000009}}.tar' or a list of tar "
                f"files, got {type(shards).__name__}."
            )
        if not names:
            raise ValueError("shards names no tar files: give a pattern such as 'data/{000000..000009}.tar'.")
        self.label_names = self._check_keys("labels", labels)
        self.caption_names = self._check_keys("captions", captions)
        if set(self.label_names) & set(self.caption_names):
            raise ValueError(
                f"{sorted(set(self.label_names) & set(self.caption_names))} is listed both as a label "
                "and as a caption key: a sidecar file is one or the other."
            )
        self.paths = [Path(name).expanduser().resolve() for name in names]
        for name, path in zip(names, self.paths):
            if "://" in name or name.startswith("pipe:"):
                raise ValueError(
                    f"{name}: only local tar files can be read (their sizes and times key the cache); "
                    "copy the shards to a local or mounted folder."
                )
            if not path.exists():
                raise FileNotFoundError(
                    f"Tar shard {path} does not exist (from {shards!r}); check the folder and "
                    "the brace range, e.g. 'data/{000000..000009}.tar'."
                )
            if not path.is_file():
                raise IsADirectoryError(
                    f"{path} is a folder, not a tar shard: give the .tar files themselves, e.g. "
                    f"'{path}/{{000000..000009}}.tar'."
                )
        if len(set(self.paths)) != len(self.paths):
            raise ValueError("shards lists the same tar file twice; each shard must appear once.")
        self.root = Path(os.path.commonpath([path.parent for path in self.paths]))
        self.shard_names = [path.relative_to(self.root).as_posix() for path in self.paths]
        self.preprocess, self.strict = preprocess, strict

    @staticmethod
    def _check_keys(what: str, keys: Sequence[str]) -> list[str]:
        keys = check_texts_list(what, keys) if keys else []
        for key in keys:
            if not re.fullmatch(r"[\w][\w.-]*", key) or key.startswith("__"):
                raise ValueError(
                    f"{what} key {key!r} is not a sidecar extension (e.g. 'cls', 'txt', 'json')."
                )
        if len(set(keys)) != len(keys):
            raise ValueError(f"{what} lists a key twice: {keys}.")
        return [key.lower() for key in keys]  # webdataset lower-cases extensions

    def __repr__(self) -> str:
        return f"TarShardDataset({self.root}, {len(self.paths)} shards, labels={self.label_names})"

    def samples(self, shard: int, skipped: list | None = None) -> Iterator[TarSample]:
        """Stream the readable samples of shard ``shard`` in tar order, decoded and preprocessed.

        ``(id, reason)`` of every skipped sample is appended to ``skipped``; without a list they are
        named in one warning when the shard ends. ``strict`` raises instead, naming the sample.
        """
        import webdataset

        shard = check_int("shard", shard, minimum=0)
        if shard >= len(self.paths):
            raise IndexError(f"shard {shard} out of range for {len(self.paths)} shards.")
        name, path = self.shard_names[shard], self.paths[shard]
        problems: list[tuple[str, str]] = [] if skipped is None else skipped
        tar_errors: list[Exception] = []

        def keep_going(error: Exception) -> bool:  # webdataset's handler: note the error, read on
            tar_errors.append(error)
            return True

        handler = webdataset.reraise_exception if self.strict else keep_going
        stream = iter(webdataset.tarfile_samples([{"url": str(path)}], handler=handler))
        seen: set[str] = set()
        index = -1
        while True:
            try:
                sample = next(stream)
            except StopIteration:
                break
            except Exception as error:  # strict: the tar itself is unreadable (truncated, not a tar, ...)
                raise ValueError(
                    f"Cannot read tar shard {path} after {index + 1} samples ({_first_line(error)}). "
                    "Replace the shard, or pass strict=False to keep the samples before the damage."
                ) from error
            index += 1
            sample_id = f"{name}/{sample['__key__']}"
            reason = "its key repeats an earlier sample of the shard" if sample_id in seen else None
            seen.add(sample_id)
            if reason is None:
                try:
                    picture, labels, captions = self._read(sample)
                except _CorruptSample as problem:
                    reason = str(problem)
            if reason is not None:
                if self.strict:
                    raise ValueError(
                        f"Sample {sample_id} of {path} is corrupt: {reason}. Replace the shard, or pass "
                        "strict=False to skip corrupt samples."
                    )
                problems.append((sample_id, reason))
                continue
            yield TarSample(self.preprocess(picture), sample_id, index, labels, captions)
        for error in tar_errors:
            problems.append(
                (
                    f"{name}/(after sample {index + 1})",
                    f"the tar is unreadable from here ({_first_line(error)})",
                )
            )
        if skipped is None:
            _warn_skipped(problems, f"tar shard {path}")

    def _read(self, sample: dict) -> tuple[Image.Image, dict[str, int], dict[str, str]]:
        files = sorted(key for key in sample if not key.startswith("__"))
        images = [ext for ext in (e[1:] for e in IMAGE_EXTENSIONS) if ext in sample]
        if not images:
            raise _CorruptSample(
                f"it has no image (its files: {', '.join('.' + k for k in files) or 'none'}; images "
                f"end in {', '.join(IMAGE_EXTENSIONS)})"
            )
        try:
            picture = load_rgb(io.BytesIO(sample[images[0]]))
        except Exception as error:  # PIL raises many types for bad files; the message is what matters
            member = (
                f"{sample['__key__']}.{images[0]}"  # not "<_io.BytesIO object at 0x...>": reasons are stored
            )
            reason = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", member, f"{type(error).__name__}: {error}")
            raise _CorruptSample(f"its .{images[0]} does not decode ({reason})") from None
        labels, captions = {}, {}
        for key in self.label_names + self.caption_names:
            if key not in sample:
                raise _CorruptSample(
                    f"it has no .{key} file (its files: {', '.join('.' + k for k in files)})"
                )
            try:
                text = sample[key].decode("utf-8")
            except UnicodeDecodeError:
                raise _CorruptSample(f"its .{key} is not UTF-8 text") from None
            if key in self.caption_names:
                captions[key] = text.strip()
                continue
            try:
                labels[key] = int(text.strip())
            except ValueError:
                raise _CorruptSample(
                    f"its .{key} holds {text.strip()[:40]!r}, not an integer label"
                ) from None
        return picture, labels, captions

    def __iter__(self) -> Iterator[TarSample]:
        from webdataset import split_by_node, split_by_worker

        skipped: list[tuple[str, str]] = []
        for shard in split_by_worker(split_by_node(range(len(self.paths)))):
            yield from self.samples(shard, skipped)
        _warn_skipped(skipped, f"the tar shards under {self.root}")

    def content_key(self) -> dict:
        digest = hashlib.sha256()
        for name, path in zip(self.shard_names, self.paths):
            stat = os.stat(path)
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return {
            "kind": self.kind,
            "root": str(self.root),
            "n_shards": len(self.paths),
            "first_shard": self.shard_names[0],
            "last_shard": self.shard_names[-1],
            "shards_sha256": digest.hexdigest(),
            "preprocess": describe_transform(self.preprocess),
            "labels": self.label_names,
            "captions": self.caption_names,
            "strict": self.strict,
        }


class _CorruptSample(Exception):
    """Why a sample of a tar shard cannot be used (its message)."""


def _first_line(error: Exception) -> str:
    """``"ReadError: unexpected end of data"``: webdataset appends the stream and url to an error's args."""
    text = str(error.args[0]) if error.args else str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _warn_skipped(skipped: Sequence[tuple[str, str]], where: str) -> None:
    if skipped:
        named = "; ".join(f"{sample_id} ({reason})" for sample_id, reason in skipped[:5])
        warnings.warn(
            f"Skipped {len(skipped)} corrupt sample(s) in {where}: {named}"
            f"{' ...' if len(skipped) > 5 else ''}. Pass strict=True to make this an error.",
            stacklevel=3,
        )
