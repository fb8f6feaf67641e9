"""Datasets: labels from folder names or metadata (never file order), stable ids, content keys, toy
attributes."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from clipdecomp import toy
from clipdecomp.datasets import DecomposableDataset, ImageFolderDataset, ToyDataset, WaterbirdsDataset
from PIL import Image

PREPROCESS = open_clip.image_transform(32, is_train=False)


def save_image(path: Path, value: int, size: int = 20, mode: str = "RGB") -> None:
    """A small solid image whose red channel encodes ``value`` (to check which file was read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 100, 50)).convert(mode).save(path)


def make_folder(root: Path, files: dict[str, list[str]]) -> Path:
    """``{class folder: [file names]}``; files are created in reverse order so mtime order != name order."""
    value = 0
    for folder, names in files.items():
        for name in reversed(names):
            save_image(root / folder / name, value)
            value += 10
    return root


def make_waterbirds(root: Path, rows: list[tuple[str, int, int, int]]) -> Path:
    """A miniature Waterbirds release: metadata.csv (img_filename, y, split, place) and the images."""
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for i, (name, y, split, place) in enumerate(rows):
        save_image(root / name, 40 * i)
        lines.append(f"{i + 1},{name},{y},{split},{place},/l/lake/natural/00000001.jpg")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_imagefolder_labels_follow_sorted_folder_names(tmp_path):
    root = make_folder(
        tmp_path / "val", {"n02": ["b.png", "a.png"], "n01": ["z.jpg", "c.JPEG"], "n03": ["x.png"]}
    )
    (root / "n01" / "notes.txt").write_text("not an image")
    data = ImageFolderDataset(root, PREPROCESS, progress=False)
    assert isinstance(data, DecomposableDataset)
    assert data.classes == ["n01", "n02", "n03"]
    assert data.ids == ["n01/c.JPEG", "n01/z.jpg", "n02/a.png", "n02/b.png", "n03/x.png"]
    assert data.labels["label"].tolist() == [0, 0, 1, 1, 2]
    image, label = data[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    # The image read for index i is the file named by ids[i].
    expected = PREPROCESS(Image.open(root / data.ids[3]).convert("RGB"))
    torch.testing.assert_close(image, expected)


def test_imagefolder_class_list_maps_wnids_to_indices(tmp_path):
    root = make_folder(tmp_path / "val", {"n02": ["a.png"], "n07": ["b.png"]})
    wnids = ["n09", "n07", "n05", "n02"]  # a given class-index order, with classes absent from the folder
    data = ImageFolderDataset(root, PREPROCESS, classes=wnids, progress=False)
    assert data.ids == ["n02/a.png", "n07/b.png"]
    assert data.labels["label"].tolist() == [3, 1]


def test_imagefolder_content_key_tracks_files(tmp_path):
    root = make_folder(tmp_path / "val", {"a": ["1.png", "2.png"], "b": ["3.png"]})
    key = ImageFolderDataset(root, PREPROCESS, progress=False).content_key()
    assert key == ImageFolderDataset(root, PREPROCESS, progress=False).content_key()
    assert key["kind"] == "imagefolder" and key["n_images"] == 3 and key["root"] == str(root.resolve())
    save_image(root / "a" / "1.png", 0, size=24)  # rewritten with another size
    changed = ImageFolderDataset(root, PREPROCESS, progress=False).content_key()
    assert changed["files_sha256"] != key["files_sha256"]
    save_image(root / "b" / "4.png", 0)
    assert ImageFolderDataset(root, PREPROCESS, progress=False).content_key()["n_images"] == 4


def test_waterbirds_split_groups_and_ids(tmp_path):
    rows = [
        ("001.Albatross/a.jpg", 1, 2, 0),
        ("002.Sparrow/b.jpg", 0, 0, 0),
        ("002.Sparrow/c.jpg", 0, 2, 1),
        ("001.Albatross/d.jpg", 1, 2, 1),
        ("003.Gull/e.jpg", 1, 1, 1),
    ]
    root = make_waterbirds(tmp_path / "waterbird_complete95_forest2water2", rows)
    test = WaterbirdsDataset(root, PREPROCESS, progress=False)
    assert test.ids == ["001.Albatross/a.jpg", "002.Sparrow/c.jpg", "001.Albatross/d.jpg"]  # metadata order
    assert test.labels["y"].tolist() == [1, 0, 1]
    assert test.labels["place"].tolist() == [0, 1, 1]
    assert test.labels["group"].tolist() == [2, 1, 3]
    assert [test.group_names[g] for g in test.labels["group"]] == [
        "waterbird on land",
        "landbird on water",
        "waterbird on water",
    ]
    image, y, place, group = test[1]
    assert image.shape == (3, 32, 32) and (y, place, group) == (0, 1, 1)
    assert len(WaterbirdsDataset(root, PREPROCESS, split="all", progress=False)) == 5
    assert WaterbirdsDataset(root, PREPROCESS, split="train", progress=False).ids == ["002.Sparrow/b.jpg"]
    assert (
        test.content_key() != WaterbirdsDataset(root, PREPROCESS, split="val", progress=False).content_key()
    )


def test_toy_dataset_labels_are_the_world_attributes():
    data = ToyDataset(8, seed=3, preprocess=PREPROCESS, split="test_groups", masks=True)
    world = toy.sample(8, 3, split="test_groups")
    for name, values in world.attributes.items():
        assert data.labels[name].tolist() == values.tolist()
    assert (
        data.labels["group"].tolist() == (2 * world.attributes["label"] + world.attributes["place"]).tolist()
    )
    assert data.labels["group"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    image, labels, mask = data[5]
    assert image.shape == (3, 32, 32) and labels["shape"] == world.attributes["shape"][5]
    assert mask.dtype == torch.bool and torch.equal(mask, torch.from_numpy(world.masks[5]))
    assert len(ToyDataset(4, seed=3, preprocess=PREPROCESS)[0]) == 2  # no mask unless asked
    assert data.ids[5] == "toy/test_groups/3/5"
    other = ToyDataset(8, seed=4, preprocess=PREPROCESS, split="test_groups")
    assert other.content_key()["images_sha256"] != data.content_key()["images_sha256"]
    assert (
        ToyDataset(8, seed=3, preprocess=PREPROCESS, split="test_groups").content_key() == data.content_key()
    )
