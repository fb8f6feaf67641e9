"""Bad files and faults: damaged caches, interrupted or concurrent runs, user folders, storage faults.

Each fault is simulated (truncated, swapped or overwritten shards, kill -9 with live DataLoader workers, a
tiny tmpfs and a read-only bind mount where the tests run as root), and each must end in an error naming
the problem and the fix, with nothing half-written read back and nothing the builder did not write
touched. tests/README.md lists every case with its test."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import clipdecomp
import numpy as np
import open_clip
import pytest
import torch
from clipdecomp.__main__ import main
from clipdecomp.cache import (
    CacheLockedError,
    CacheStorageError,
    CorruptCacheError,
    DecompositionCache,
    IncompleteCacheError,
    StaleCacheError,
)
from clipdecomp.datasets import (
    ImageFolderDataset,
    ToyDataset,
    WaterbirdsDataset,
    load_rgb,
)
from PIL import Image
from test_cache import PREPROCESS, save_tiny_local_dir, tiny_bundle
from test_datasets import make_folder, make_waterbirds, save_image

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent


def assert_same_cache(a: DecompositionCache, b: DecompositionCache) -> None:
    assert a.ids == b.ids and a.indices.tolist() == b.indices.tolist() and len(set(a.ids)) == len(a.ids)
    for name in a.manifest["fields"]:
        np.testing.assert_allclose(
            np.asarray(a.field(name), np.float32), np.asarray(b.field(name), np.float32), atol=1e-3
        )
    assert {k: v.tolist() for k, v in a.labels.items()} == {k: v.tolist() for k, v in b.labels.items()}


# --- image files in a dataset folder ---------------------------------------------------------------


def test_grayscale_rgba_cmyk_palette_16bit_files_become_rgb(tmp_path):
    root = tmp_path / "val"
    save_image(root / "a" / "gray.png", 90, mode="L")
    save_image(root / "a" / "cmyk.jpg", 90, mode="CMYK")
    rgba = Image.new("RGBA", (20, 20), (10, 200, 30, 0))  # fully transparent
    (root / "b").mkdir()
    rgba.save(root / "b" / "clear.png")
    palette = Image.new("P", (20, 20), 0)
    palette.save(root / "b" / "palette.gif", transparency=0)
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(root / "b" / "deep.png")
    data = ImageFolderDataset(root, PREPROCESS, progress=False)
    assert len(data) == 5 and not data.skipped
    for i in range(5):
        image = data.image(i)
        assert image.shape == (3, 32, 32) and torch.isfinite(image).all()
    assert np.asarray(load_rgb(root / "b" / "clear.png"))[0, 0].tolist() == [
        255,
        255,
        255,
    ]  # composited on white
    gray = np.asarray(load_rgb(root / "a" / "gray.png"))
    assert gray.shape == (20, 20, 3) and (gray[..., 0] == gray[..., 2]).all()
    assert load_rgb(root / "a" / "cmyk.jpg").mode == "RGB"
    assert (
        np.asarray(load_rgb(root / "b" / "deep.png")).max() == 156
    )  # 16-bit scaled (40000 / 257), not clipped


def make_corrupt_folder(root: Path) -> Path:
    make_folder(root, {"a": ["good.png"], "b": ["fine.jpg"]})
    (root / "a" / "empty.jpg").write_bytes(b"")
    whole = (root / "b" / "fine.jpg").read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "b" / "text.png").write_text("this is not a png")
    return root


def test_corrupt_files_are_skipped_with_one_warning(tmp_path):
    root = make_corrupt_folder(tmp_path / "val")
    with pytest.warns(UserWarning) as caught:
        data = ImageFolderDataset(root, PREPROCESS, progress=False)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "Skipped 3 unreadable" in message and "strict=True" in message
    for name in ("a/empty.jpg", "b/truncated.jpg", "b/text.png"):
        assert name in message
    assert data.ids == ["a/good.png", "b/fine.jpg"] and data.labels["label"].tolist() == [0, 1]
    assert {rel for rel, _ in data.skipped} == {"a/empty.jpg", "b/truncated.jpg", "b/text.png"}
    assert "truncated" in dict(data.skipped)["b/truncated.jpg"].lower()
    assert data.content_key()["skipped"] == [rel for rel, _ in data.skipped]


def test_corrupt_file_strict_mode_names_it(tmp_path):
    root = make_corrupt_folder(tmp_path / "val")
    with pytest.raises(ValueError, match=r"a/empty\.jpg.*strict=False"):
        ImageFolderDataset(root, PREPROCESS, strict=True, progress=False)


def test_file_corrupted_after_checking_is_named(tmp_path):
    root = make_folder(tmp_path / "val", {"a": ["x.png"]})
    data = ImageFolderDataset(root, PREPROCESS, progress=False)
    (root / "a" / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"a/x\.png.*recreate the dataset"):
        data.image(0)


# --- dataset folders missing or in the wrong layout ----------------------------------------------------


def test_imagefolder_missing_or_wrong_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*one sub-folder per class"):
        ImageFolderDataset(tmp_path / "nowhere", PREPROCESS)
    flat = tmp_path / "flat"
    save_image(flat / "ILSVRC2012_val_00000001.JPEG", 0)
    with pytest.raises(ValueError, match="1 images directly in it but no class folders.*per wnid"):
        ImageFolderDataset(flat, PREPROCESS)
    (tmp_path / "empty" / "n01").mkdir(parents=True)
    with pytest.raises(ValueError, match="No image files"):
        ImageFolderDataset(tmp_path / "empty", PREPROCESS)
    root = make_folder(tmp_path / "val", {"n01": ["a.png"], "n99": ["b.png"]})
    with pytest.raises(ValueError, match=r"\['n99'\].*not in the given classes"):
        ImageFolderDataset(root, PREPROCESS, classes=["n01", "n02"])


def test_waterbirds_missing_or_wrong_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*waterbird_complete95_forest2water2"):
        WaterbirdsDataset(tmp_path / "nowhere", PREPROCESS)
    (tmp_path / "no_meta").mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.csv is missing.*Sagawa"):
        WaterbirdsDataset(tmp_path / "no_meta", PREPROCESS)
    root = make_waterbirds(tmp_path / "wb", [("001.A/a.jpg", 1, 2, 0), ("001.A/b.jpg", 0, 2, 1)])
    metadata = (root / "metadata.csv").read_text()
    (root / "metadata.csv").write_text(
        metadata.replace("img_id,img_filename,y,", "img_id,img_filename,label,")
    )
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['y'\].*img_filename, y, split, place"):
        WaterbirdsDataset(root, PREPROCESS)
    (root / "metadata.csv").write_text(metadata.replace("001.A/b.jpg,0,2,1", "001.A/b.jpg,0,7,1"))
    with pytest.raises(ValueError, match="line 3.*split in"):
        WaterbirdsDataset(root, PREPROCESS)
    (root / "metadata.csv").write_text(metadata)
    (root / "001.A" / "b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 image.*missing.*incomplete"):
        WaterbirdsDataset(root, PREPROCESS)
    with pytest.raises(ValueError, match="split must be"):
        WaterbirdsDataset(root, PREPROCESS, split="testing")


# --- model, text and tensor inputs -------------------------------------------------------------------


def test_cli_wrong_model_spec_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "decompose",
                "--model",
                "ViT-Q-99",
                "--data",
                "toy",
                "--out",
                str(tmp_path / "c"),
                "--no-progress",
            ]
        )
    assert exit_info.value.code == 2
    assert "not an open_clip architecture" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(pool_type="none"), "Pooling 'none'"),
        (dict(scaled_cosine_attn=True), "CustomResidualAttentionBlock"),
        (dict(proj=None), "without a final projection"),
    ],
    ids=["pool-none", "cosine-attention", "no-projection"],
)
def test_unsupported_towers_refused_before_writing(tmp_path, overrides, match):
    remove_proj = overrides.pop("proj", "keep") is None
    bundle = tiny_bundle(**overrides)
    if remove_proj:
        bundle.model.visual.proj = None
    with pytest.raises(NotImplementedError, match=match + ".*supported"):
        DecompositionCache.build(bundle, ToyDataset(2, preprocess=PREPROCESS), tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_empty_or_bad_text_inputs():
    bundle = tiny_bundle()
    with pytest.raises(ValueError, match="empty list"):
        bundle.encode_text([])
    data = ToyDataset(2, preprocess=PREPROCESS)
    for texts, match in (
        (torch.zeros(0, 24), r"\[T, 24\]"),
        (torch.randn(3, 10), r"\[T, 24\].*encode_text"),
        (torch.full((2, 24), float("nan")), "NaN or Inf"),
    ):
        with pytest.raises(ValueError, match=match):
            DecompositionCache.build(bundle, data, "/nonexistent/never-created", text_directions=texts)
    with pytest.raises(ValueError, match="2 names for 3"):
        DecompositionCache.build(
            bundle,
            data,
            "/nonexistent/never-created",
            text_directions=torch.randn(3, 24),
            text_labels=["a", "b"],
        )


def test_inf_pixels_rejected():
    with pytest.raises(ValueError, match="NaN or Inf"):
        clipdecomp.decompose(tiny_bundle(), torch.full((1, 3, 32, 32), float("inf")))


def test_layers_out_of_range_refused_before_writing(tmp_path, capsys):
    with pytest.raises(IndexError, match=r"\[3\] out of range.*3 layers"):
        DecompositionCache.build(
            tiny_bundle(), ToyDataset(2, preprocess=PREPROCESS), tmp_path / "c", layers=[3]
        )
    assert not (tmp_path / "c").exists()
    with pytest.raises(SystemExit):
        main(
            ["decompose", "--model", "toy", "--data", "toy", "--out", str(tmp_path / "c"), "--layers", "last"]
        )
    assert "use 'all', 'none'" in capsys.readouterr().err


class Faulty(ToyDataset):
    """A toy dataset (same content key) whose image ``bad_index`` is NaN, or raises, or kills the process."""

    def __init__(self, *args, bad_index: int, fault: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_index, self.fault = bad_index, fault

    def image(self, index: int) -> torch.Tensor:
        if index == self.bad_index:
            if self.fault == "nan":
                return torch.full((3, 32, 32), float("nan"))
            if self.fault == "size":
                return torch.zeros(3, 64, 64)
            raise OSError(f"disk error reading image {index}")
        return super().image(index)


@pytest.mark.parametrize(
    "fault, error, match",
    [
        ("nan", ValueError, r"toy/uniform/0/5 .*NaN or Inf"),
        (
            "size",
            ValueError,
            r"toy/uniform/0/5 \(index 5\) has shape \[3, 64, 64\].*\[3, 32, 32\].*preprocess",
        ),
        ("raise", OSError, "disk error"),
    ],
    ids=["nan", "size", "raise"],
)
def test_failure_mid_build_keeps_whole_shards_and_resumes(tmp_path, fault, error, match):
    bundle, out = tiny_bundle(), tmp_path / "c"
    with pytest.raises(error, match=match):
        DecompositionCache.build(
            bundle,
            Faulty(10, preprocess=PREPROCESS, bad_index=5, fault=fault),
            out,
            batch_size=2,
            shard_size=4,
            progress=False,
        )
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "shard_00000",
    ]  # no partial shard, no lock file
    with pytest.raises(IncompleteCacheError, match="1 of 3 shards.*same arguments to resume"):
        DecompositionCache.open(out)
    first_shard = (out / "shard_00000" / "heads.npy").stat().st_mtime_ns
    resumed = DecompositionCache.build(
        bundle, ToyDataset(10, preprocess=PREPROCESS), out, batch_size=2, shard_size=4, progress=False
    )
    assert (out / "shard_00000" / "heads.npy").stat().st_mtime_ns == first_shard  # kept, not recomputed
    clean = DecompositionCache.build(
        bundle,
        ToyDataset(10, preprocess=PREPROCESS),
        tmp_path / "clean",
        batch_size=2,
        shard_size=4,
        progress=False,
    )
    assert_same_cache(resumed, clean)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from clipdecomp.cache import DecompositionCache
from clipdecomp.datasets import ToyDataset
from test_cache import PREPROCESS, save_tiny_local_dir, tiny_bundle

class Dying(ToyDataset):
    def image(self, index):
        if index == 9:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, like a lost machine
        return super().image(index)

DecompositionCache.build(tiny_bundle(), Dying(10, preprocess=PREPROCESS), {out!r}, batch_size=2, shard_size=4,
                         progress=False)
"""


def test_killed_run_resumes_with_every_row_once(tmp_path):
    out = tmp_path / "c"
    script = KILLED_RUN.format(tests=str(TESTS), out=str(out))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000", "shard_00001"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "building"
    with pytest.raises(IncompleteCacheError):
        DecompositionCache.open(out)
    leftover = out / ".shard_00002.clipdecomp-tmp-99999"  # what a kill during a shard write leaves behind
    leftover.mkdir()
    (leftover / "heads.npy").write_bytes(b"half a file")
    kept = {p: p.stat().st_mtime_ns for p in out.glob("shard_*/*.npy")}
    resumed = DecompositionCache.build(
        tiny_bundle(), ToyDataset(10, preprocess=PREPROCESS), out, batch_size=2, shard_size=4, progress=False
    )
    assert not leftover.exists()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    clean = DecompositionCache.build(
        tiny_bundle(),
        ToyDataset(10, preprocess=PREPROCESS),
        tmp_path / "clean",
        batch_size=2,
        shard_size=4,
        progress=False,
    )
    assert_same_cache(resumed, clean)
    assert resumed.ids == ToyDataset(10, preprocess=PREPROCESS).ids


HOLD_LOCK = """
import fcntl, os, sys, time
descriptor = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(descriptor, fcntl.LOCK_EX)  # what a running build holds: a lock on the folder itself
print("locked", flush=True)
time.sleep(60)
"""


def test_second_writer_gets_a_clear_error(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CacheLockedError, match=r"being written by another run.*Wait"):
            DecompositionCache.build(tiny_bundle(), ToyDataset(2, preprocess=PREPROCESS), out, progress=False)
        assert list(out.iterdir()) == []  # the second run wrote nothing, not even a lock file
    finally:
        holder.kill()
        holder.wait()
    cache = DecompositionCache.build(tiny_bundle(), ToyDataset(2, preprocess=PREPROCESS), out, progress=False)
    assert len(cache) == 2  # the lock dies with its holder


def test_stale_cache_names_what_differs_and_is_left_alone(tmp_path):
    out = tmp_path / "c"
    cache = DecompositionCache.build(
        tiny_bundle(), ToyDataset(4, seed=0, preprocess=PREPROCESS), out, progress=False
    )
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    other_model = tiny_bundle()
    with torch.no_grad():
        other_model.model.visual.proj.mul_(2)
    with pytest.raises(StaleCacheError, match=r"model\.weights: cache has .*Delete the folder"):
        DecompositionCache.build(
            other_model, ToyDataset(4, seed=0, preprocess=PREPROCESS), out, progress=False
        )
    with pytest.raises(
        StaleCacheError, match=r"dataset\.images_sha256.*dataset\.seed: cache has 0, requested 1"
    ):
        DecompositionCache.build(
            tiny_bundle(), ToyDataset(4, seed=1, preprocess=PREPROCESS), out, progress=False
        )
    bilinear = open_clip.image_transform(32, is_train=False, interpolation="bilinear")
    with pytest.raises(StaleCacheError, match=r"dataset\.preprocess: cache has"):
        DecompositionCache.build(
            tiny_bundle(), ToyDataset(4, seed=0, preprocess=bilinear), out, progress=False
        )
    with pytest.raises(StaleCacheError, match=r"reductions\.dtype"):
        DecompositionCache.build(
            tiny_bundle(), ToyDataset(4, seed=0, preprocess=PREPROCESS), out, dtype="float32", progress=False
        )
    wanted = json.loads(json.dumps(cache.key))
    wanted["model"]["spec"] = "ViT-B-16"
    with pytest.raises(StaleCacheError, match=r"model\.spec: cache has \"tiny\", requested \"ViT-B-16\""):
        DecompositionCache.open(out, expected_key=wanted)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")} == stamps
    with pytest.raises(FileExistsError, match="not a decomposition cache"):
        DecompositionCache.build(
            tiny_bundle(),
            ToyDataset(4, preprocess=PREPROCESS),
            tmp_path / "c" / "shard_00000",
            progress=False,
        )


# --- a finished cache proves it is whole before it is read (and a rerun repairs it) ------------------


def small_cache(out: Path, n: int = 10, **kwargs) -> DecompositionCache:
    """A 3-shard cache of the tiny model (4 + 4 + 2 images); the same call resumes or repairs it."""
    return DecompositionCache.build(
        tiny_bundle(),
        ToyDataset(n, preprocess=PREPROCESS),
        out,
        batch_size=4,
        shard_size=4,
        progress=False,
        **kwargs,
    )


def stamps(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("shard_*/*.npy")}


def rewritten(before: dict[str, int], out: Path) -> set[str]:
    """The shard folders whose files changed since ``before``."""
    after = stamps(out)
    return {name.split("/")[0] for name in set(before) | set(after) if before.get(name) != after.get(name)}


def repaired_equals_clean(out: Path, tmp_path: Path, **kwargs) -> set[str]:
    """Rebuild ``out`` with the same arguments (a warning names the damage); compare with a clean build."""
    before = stamps(out)
    with pytest.warns(UserWarning, match="damaged|unreadable|recomputing"):
        repaired = small_cache(out, **kwargs)
    assert_same_cache(repaired.verify(), small_cache(tmp_path / "clean", **kwargs))
    return rewritten(before, out)


def test_truncated_shard_file_named_on_open_and_repaired(tmp_path):
    out = tmp_path / "c"
    small_cache(out)
    heads = out / "shard_00001" / "heads.npy"
    heads.write_bytes(heads.read_bytes()[: heads.stat().st_size // 2])
    with pytest.raises(
        CorruptCacheError,
        match=r"shard_00001/heads\.npy has \d+ bytes, \d+ were written.*same "
        r"arguments.*only the damaged shards",
    ):
        DecompositionCache.open(out)
    assert repaired_equals_clean(out, tmp_path) == {"shard_00001"}  # only the damaged shard is recomputed


@pytest.mark.parametrize("fault", ["swapped", "duplicated"])
def test_swapped_or_duplicated_shards_refused_and_repaired(tmp_path, fault):
    out = tmp_path / "c"
    small_cache(out, n=8)  # two shards of four images: same file sizes, only the checksums differ
    if fault == "swapped":
        (out / "shard_00000").rename(out / "moved")
        (out / "shard_00001").rename(out / "shard_00000")
        (out / "moved").rename(out / "shard_00001")
    else:
        shutil.rmtree(out / "shard_00001")
        shutil.copytree(out / "shard_00000", out / "shard_00001")
    with pytest.raises(
        CorruptCacheError,
        match=r"shard_00001/ids\.npy does not match the checksum.*should hold "
        r"images 'toy/uniform/0/4'\.\.'toy/uniform/0/7'",
    ):
        DecompositionCache.open(out)
    expected = {"shard_00000", "shard_00001"} if fault == "swapped" else {"shard_00001"}
    assert repaired_equals_clean(out, tmp_path, n=8) == expected


def test_values_overwritten_in_place_found_by_verify_and_repaired(tmp_path, capsys):
    out = tmp_path / "c"
    small_cache(out)
    attns = out / "shard_00001" / "attns.npy"
    raw = bytearray(attns.read_bytes())
    raw[-40:] = bytes(40)  # same size, valid header: only a checksum can tell
    attns.write_bytes(bytes(raw))
    cache = DecompositionCache.open(out)  # the cheap checks pass ...
    with pytest.raises(CorruptCacheError, match=r"shard_00001/attns\.npy does not match the checksum"):
        cache.verify()  # ... the full one does not
    with pytest.raises(CorruptCacheError, match="attns.npy"):
        DecompositionCache.open(out, verify=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(out)])
    assert exit_info.value.code == 2 and "shard_00001/attns.npy" in capsys.readouterr().err
    assert repaired_equals_clean(out, tmp_path) == {"shard_00001"}
    main(["verify", str(out)])
    assert "all 48 files match" in capsys.readouterr().out


def _damage(out: Path, fault: str) -> None:
    shard = out / "shard_00000"
    if fault == "npy-header":
        norm = shard / "norm.npy"
        norm.write_bytes(b"garbage!!!" + norm.read_bytes()[10:])
    elif fault == "missing-file":
        (shard / "mlps.npy").unlink()
    elif fault == "labels-edited":
        labels = np.load(shard / "label_shape.npy")
        np.save(shard / "label_shape.npy", (labels + 1) % 4)
    elif fault == "missing-shard":
        shutil.rmtree(out / "shard_00001")
    elif fault == "manifest-json":
        (out / "manifest.json").write_text('{"format": 2, "status": "comp')
    elif fault == "manifest-fields":
        manifest = json.loads((out / "manifest.json").read_text())
        del manifest["n_shards"]
        (out / "manifest.json").write_text(json.dumps(manifest))
    elif fault == "text-directions":
        np.save(out / "text_directions.npy", np.ones((2, 24), dtype=np.float32))


@pytest.mark.parametrize(
    "fault, match",
    [
        ("npy-header", r"shard_00000/norm\.npy is unreadable \(ValueError"),
        ("missing-file", r"shard_00000/mlps\.npy is missing"),
        ("labels-edited", r"shard_00000/label_shape\.npy does not match the checksum"),
        ("missing-shard", r"shard_00001 is missing"),
        ("manifest-json", r"manifest\.json is unreadable \(JSONDecodeError"),
        ("manifest-fields", r"manifest\.json lacks a valid 'n_shards'"),
        ("text-directions", r"text_directions\.npy does not hold the directions"),
    ],
    ids=[
        "npy-header",
        "missing-file",
        "labels-edited",
        "missing-shard",
        "manifest-json",
        "manifest-fields",
        "text-directions",
    ],
)
def test_damaged_files_are_named_with_their_path_and_repaired(tmp_path, fault, match):
    out = tmp_path / "c"
    texts = dict(text_directions=torch.randn(2, 24, generator=torch.Generator().manual_seed(0)))
    kwargs = texts if fault == "text-directions" else {}
    small_cache(out, **kwargs)
    _damage(out, fault)
    with pytest.raises(
        CorruptCacheError, match=match + r".*(Build it again|build again) with the same arguments"
    ):
        DecompositionCache.open(out)
    if fault == "text-directions":
        small_cache(out, **kwargs)  # the directions are rewritten from the arguments; the shards stay
        assert_same_cache(DecompositionCache.open(out).verify(), small_cache(tmp_path / "clean", **kwargs))
    else:
        repaired_equals_clean(out, tmp_path)


def as_format_1(out: Path) -> None:
    """Turn a cache into what clipdecomp wrote before checksums: format 1, a lock file, a temporary."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format"] = manifest["key"]["format"] = 1
    del manifest["shards"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / ".lock").write_text("pid 1 on old-host")
    (out / ".shard_00002.tmp-77").mkdir()


def test_old_format_cache_is_checked_and_upgraded_by_the_same_build(tmp_path):
    out = tmp_path / "c"
    small_cache(out)
    as_format_1(out)
    np.save(
        out / "shard_00001" / "ids.npy", np.array(["toy/uniform/0/0"] * 4)
    )  # one shard that is not what it says
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(StaleCacheError, match="cache format 1, without the checksums.*same arguments"):
        DecompositionCache.open(out)
    with pytest.raises(StaleCacheError, match="cache format 1 from other inputs.*delete the folder"):
        small_cache(out, dtype="float32")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # refusals touch nothing
    kept = stamps(out)
    with pytest.warns(UserWarning) as caught:
        upgraded = small_cache(out)
    messages = " ".join(str(w.message) for w in caught)
    assert "format 1, without checksums: checking its shards" in messages
    assert "shard_00001 (format 1) does not hold the images this build puts there" in messages
    assert rewritten(kept, out) == {"shard_00001"}  # the two sound shards are kept, the wrong one recomputed
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "shard_00000",
        "shard_00001",
        "shard_00002",
    ]
    assert_same_cache(upgraded.verify(), small_cache(tmp_path / "clean"))


def test_cli_rerun_repairs_a_truncated_cache_instead_of_succeeding_silently(tmp_path, capsys):
    save_tiny_local_dir(tmp_path / "model")
    args = [
        "decompose",
        "--model",
        str(tmp_path / "model"),
        "--data",
        "toy",
        "--n-images",
        "8",
        "--out",
        str(tmp_path / "c"),
        "--shard-size",
        "4",
        "--no-progress",
    ]
    main(args)
    norm = tmp_path / "c" / "shard_00001" / "norm.npy"
    norm.write_bytes(norm.read_bytes()[:-8])  # 64 images said, fewer held: the case from the issue
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"recomputing 1 damaged shard.*shard_00001/norm\.npy"):
        main(args)
    assert "8 images" in capsys.readouterr().out
    main(["verify", str(tmp_path / "c")])
    assert "8 images in 2 shards" in capsys.readouterr().out


# --- the builder never deletes or writes what it did not create -------------------------------------------


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("fault", ["dot-entries", "plain-file", "old-temp-name", "foreign-manifest"])
def test_user_folders_are_refused_and_left_exactly_as_they_were(tmp_path, fault):
    out = tmp_path / "mine"
    out.mkdir()
    if fault == "dot-entries":
        (out / ".git").mkdir()
        (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        (out / ".notes").write_text("hidden, still mine")
    elif fault == "plain-file":
        (out / "thesis.tex").write_text("\\documentclass{article}")
    elif fault == "old-temp-name":
        (out / ".shard_00000.tmp-1").mkdir()  # looks like an old temporary shard: still not the builder's
        (out / ".shard_00000.tmp-1" / "heads.npy").write_bytes(b"mine")
    else:
        (out / "manifest.json").write_text(json.dumps({"name": "my project"}))
    before = listing(out)
    with pytest.raises(
        FileExistsError,
        match="not empty and is not a decomposition cache|cannot be read as a "
        "decomposition cache.*nothing was touched",
    ):
        small_cache(out)
    assert listing(out) == before  # no lock file, no manifest, nothing removed


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "cache"
    path.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        small_cache(path)
    assert path.read_text() == "not a folder"


@pytest.mark.parametrize("where", ["new-folder", "empty-folder"])
def test_failure_before_the_first_shard_leaves_the_folder_as_found(tmp_path, where):
    out = tmp_path / "a" / "b" if where == "new-folder" else tmp_path / "empty"
    if where == "empty-folder":
        out.mkdir()
    texts = torch.randn(2, 24)
    with pytest.raises(ValueError, match="NaN or Inf"):
        DecompositionCache.build(
            tiny_bundle(),
            Faulty(6, preprocess=PREPROCESS, bad_index=0, fault="nan"),
            out,
            text_directions=texts,
            shard_size=4,
            progress=False,
        )
    if where == "new-folder":
        assert not (tmp_path / "a").exists()  # the folders it created are gone too
    else:
        assert list(out.iterdir()) == []
    cache = DecompositionCache.build(
        tiny_bundle(), ToyDataset(6, preprocess=PREPROCESS), out, dtype="float32", progress=False
    )  # the corrected rerun, with other arguments, just works
    assert len(cache) == 6


def test_foreign_file_inside_a_damaged_shard_is_kept(tmp_path):
    out = tmp_path / "c"
    small_cache(out)
    (out / "shard_00002" / "norm.npy").write_bytes(b"short")
    (out / "shard_00002" / "my_notes.txt").write_text("keep me")
    with (
        pytest.warns(UserWarning, match="damaged"),
        pytest.raises(FileExistsError, match=r"my_notes\.txt.*move them"),
    ):
        small_cache(out)
    assert (out / "shard_00002" / "my_notes.txt").read_text() == "keep me"


STALLED_WORKERS = """
import os, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from clipdecomp.cache import DecompositionCache
from clipdecomp.datasets import ToyDataset
from test_cache import PREPROCESS, save_tiny_local_dir, tiny_bundle

class Stalling(ToyDataset):
    def image(self, index):
        if torch.utils.data.get_worker_info() is not None:  # in a worker: report, then hang (a slow disk)
            open(os.path.join({flags!r}, str(os.getpid())), "w").close()
            time.sleep(120)
        return super().image(index)

DecompositionCache.build(tiny_bundle(), Stalling(10, preprocess=PREPROCESS), {out!r}, batch_size=2,
                         shard_size=4, num_workers=2, progress=False)
"""


def test_killed_parent_with_live_workers_does_not_hold_the_lock(tmp_path):
    out, flags = tmp_path / "c", tmp_path / "flags"
    flags.mkdir()
    script = STALLED_WORKERS.format(tests=str(TESTS), out=str(out), flags=str(flags))
    parent = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.2)
            workers = [int(p.name) for p in flags.iterdir()]
        assert len(workers) == 2, (
            parent.stderr.read() if parent.poll() is not None else "workers did not start"
        )
        parent.kill()  # SIGKILL: no cleanup; the two workers live on, sleeping
        parent.wait()
        for pid in workers:
            os.kill(pid, 0)  # still alive
        assert not list(out.glob("shard_*"))
        cache = DecompositionCache.build(
            tiny_bundle(), ToyDataset(6, preprocess=PREPROCESS), out, shard_size=4, progress=False
        )  # neither refused as locked nor as stale: no shard was done
        assert len(cache) == 6
    finally:
        parent.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- storage faults: read-only storage and a full disk, simulated with mounts ------------------------------


@pytest.fixture
def mounts():
    """``mount(kind, target, ...)``: a tiny tmpfs or a read-only bind mount, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip(
            "storage faults are simulated with a tmpfs and a read-only bind mount, which need root "
            f"(id -u is {os.geteuid()}); run the tests as root to cover them"
        )
    mounted: list[Path] = []

    def mount(kind: str, target: Path, source: Path | None = None, size: str = "1m") -> Path:
        target.mkdir(parents=True, exist_ok=True)
        if kind == "tmpfs":
            commands = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)]]
        elif kind == "read-only":
            commands = [
                ["mount", "--bind", str(source), str(target)],
                ["mount", "-o", "remount,bind,ro", str(target)],
            ]
        else:  # resize an existing tmpfs
            commands = [["mount", "-o", f"remount,size={size}", str(target)]]
        for command in commands:
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                pytest.skip(
                    f"cannot simulate storage faults here: {' '.join(command)}: {result.stderr.strip()}"
                )
            if target not in mounted:
                mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        if subprocess.run(["umount", str(target)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def cli_args(model: Path, out: Path, n: int = 10) -> list[str]:
    return [
        "decompose",
        "--model",
        str(model),
        "--data",
        "toy",
        "--n-images",
        str(n),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--shard-size",
        "4",
        "--no-progress",
    ]


def one_line_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_complete_cache_on_read_only_storage_is_reused(tmp_path, mounts, capsys):
    save_tiny_local_dir(tmp_path / "model")
    main(cli_args(tmp_path / "model", tmp_path / "src"))
    view = mounts("read-only", tmp_path / "ro", source=tmp_path / "src")
    before = listing(view)
    main(cli_args(tmp_path / "model", view))  # the CLI: nothing to write, so no lock file and no error
    assert "10 images" in capsys.readouterr().out
    bundle = clipdecomp.load(str(tmp_path / "model"))
    cache = DecompositionCache.build(
        bundle, ToyDataset(10, 0, bundle.preprocess), view, batch_size=4, shard_size=4, progress=False
    )  # build() itself, verified in full
    assert len(cache) == 10 and listing(view) == before


def test_unfinished_cache_on_read_only_storage_is_one_clear_line(tmp_path, mounts, capsys):
    save_tiny_local_dir(tmp_path / "model")
    main(cli_args(tmp_path / "model", tmp_path / "src"))
    manifest = json.loads((tmp_path / "src" / "manifest.json").read_text())
    manifest.update(status="building")  # what a run killed before its last shard leaves
    del manifest["shards"]["shard_00002"]
    (tmp_path / "src" / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(tmp_path / "src" / "shard_00002")
    view = mounts("read-only", tmp_path / "ro", source=tmp_path / "src")
    before = listing(view)
    err = one_line_error(capsys, cli_args(tmp_path / "model", view))
    assert "read-only storage" in err and "copy it to writable storage" in err
    with pytest.raises(CacheStorageError, match="read-only"):  # a new cache under read-only storage: same
        small_cache(view / "new")
    assert listing(view) == before


def test_full_disk_is_one_clear_line_and_the_cache_resumes(tmp_path, mounts, capsys):
    save_tiny_local_dir(tmp_path / "model")
    disk = mounts("tmpfs", tmp_path / "disk", size="120k")  # room for the manifest and one shard of three
    out = disk / "c"
    err = one_line_error(capsys, cli_args(tmp_path / "model", out))
    assert re.search(
        r"No space left on the device holding .*shard_00001; it needs about \d+ KB \(and about \d+ KB "
        r"for the 1 shard after it\), and \d+ KB is free.*run the same build again",
        err,
    ), err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard_00000"]  # whole shards only
    kept = stamps(out)
    mounts("resize", disk, size="4m")
    main(cli_args(tmp_path / "model", out))
    assert "10 images" in capsys.readouterr().out
    assert rewritten(kept, out) == {"shard_00001", "shard_00002"}  # resumed, not restarted
    DecompositionCache.open(out, verify=True)
