"""Bad inputs and interrupted runs: each fails with an error naming the problem and the fix, and nothing
half-written is ever read back (faults already covered in test_loading.py / test_decomposition.py are not repeated)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import clipdecomp
from clipdecomp.__main__ import main
from clipdecomp.cache import CacheLockedError, DecompositionCache, IncompleteCacheError, StaleCacheError
from clipdecomp.datasets import ImageFolderDataset, ToyDataset, WaterbirdsDataset, load_rgb
from test_cache import PREPROCESS, tiny_bundle
from test_datasets import make_folder, make_waterbirds, save_image

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent


def assert_same_cache(a: DecompositionCache, b: DecompositionCache) -> None:
    assert a.ids == b.ids and a.indices.tolist() == b.indices.tolist() and len(set(a.ids)) == len(a.ids)
    for name in a.manifest["fields"]:
        np.testing.assert_allclose(np.asarray(a.field(name), np.float32), np.asarray(b.field(name), np.float32),
                                   atol=1e-3)
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
    assert np.asarray(load_rgb(root / "b" / "clear.png"))[0, 0].tolist() == [255, 255, 255]  # composited on white
    gray = np.asarray(load_rgb(root / "a" / "gray.png"))
    assert gray.shape == (20, 20, 3) and (gray[..., 0] == gray[..., 2]).all()
    assert load_rgb(root / "a" / "cmyk.jpg").mode == "RGB"
    assert np.asarray(load_rgb(root / "b" / "deep.png")).max() == 156  # 16-bit scaled (40000 / 257), not clipped


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
    (root / "metadata.csv").write_text(metadata.replace("img_id,img_filename,y,", "img_id,img_filename,label,"))
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
        main(["decompose", "--model", "ViT-Q-99", "--data", "toy", "--out", str(tmp_path / "c"), "--no-progress"])
    assert exit_info.value.code == 2
    assert "not an open_clip architecture" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("overrides, match", [
    (dict(pool_type="none"), "Pooling 'none'"),
    (dict(scaled_cosine_attn=True), "CustomResidualAttentionBlock"),
    (dict(proj=None), "without a final projection"),
], ids=["pool-none", "cosine-attention", "no-projection"])
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
    for texts, match in ((torch.zeros(0, 24), r"\[T, 24\]"), (torch.randn(3, 10), r"\[T, 24\].*encode_text"),
                         (torch.full((2, 24), float("nan")), "NaN or Inf")):
        with pytest.raises(ValueError, match=match):
            DecompositionCache.build(bundle, data, "/nonexistent/never-created", text_directions=texts)
    with pytest.raises(ValueError, match="2 names for 3"):
        DecompositionCache.build(bundle, data, "/nonexistent/never-created", text_directions=torch.randn(3, 24),
                                 text_labels=["a", "b"])


def test_inf_pixels_rejected():
    with pytest.raises(ValueError, match="NaN or Inf"):
        clipdecomp.decompose(tiny_bundle(), torch.full((1, 3, 32, 32), float("inf")))


def test_layers_out_of_range_refused_before_writing(tmp_path, capsys):
    with pytest.raises(IndexError, match=r"\[3\] out of range.*3 layers"):
        DecompositionCache.build(tiny_bundle(), ToyDataset(2, preprocess=PREPROCESS), tmp_path / "c", layers=[3])
    assert not (tmp_path / "c").exists()
    with pytest.raises(SystemExit):
        main(["decompose", "--model", "toy", "--data", "toy", "--out", str(tmp_path / "c"), "--layers", "last"])
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


@pytest.mark.parametrize("fault, error, match", [
    ("nan", ValueError, r"toy/uniform/0/5 .*NaN or Inf"),
    ("size", ValueError, r"toy/uniform/0/5 \(index 5\) has shape \[3, 64, 64\].*\[3, 32, 32\].*preprocess"),
    ("raise", OSError, "disk error"),
])
def test_failure_mid_build_keeps_whole_shards_and_resumes(tmp_path, fault, error, match):
    bundle, out = tiny_bundle(), tmp_path / "c"
    with pytest.raises(error, match=match):
        DecompositionCache.build(bundle, Faulty(10, preprocess=PREPROCESS, bad_index=5, fault=fault), out,
                                 batch_size=2, shard_size=4, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "manifest.json", "shard_00000"]  # no partial shard
    with pytest.raises(IncompleteCacheError, match="1 of 3 shards.*same arguments to resume"):
        DecompositionCache.open(out)
    first_shard = (out / "shard_00000" / "heads.npy").stat().st_mtime_ns
    resumed = DecompositionCache.build(bundle, ToyDataset(10, preprocess=PREPROCESS), out, batch_size=2,
                                       shard_size=4, progress=False)
    assert (out / "shard_00000" / "heads.npy").stat().st_mtime_ns == first_shard  # kept, not recomputed
    clean = DecompositionCache.build(bundle, ToyDataset(10, preprocess=PREPROCESS), tmp_path / "clean",
                                     batch_size=2, shard_size=4, progress=False)
    assert_same_cache(resumed, clean)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from clipdecomp.cache import DecompositionCache
from clipdecomp.datasets import ToyDataset
from test_cache import PREPROCESS, tiny_bundle

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
    leftover = out / ".shard_00002.tmp-99999"  # what a kill during a shard write leaves behind
    leftover.mkdir()
    (leftover / "heads.npy").write_bytes(b"half a file")
    kept = {p: p.stat().st_mtime_ns for p in out.glob("shard_*/*.npy")}
    resumed = DecompositionCache.build(tiny_bundle(), ToyDataset(10, preprocess=PREPROCESS), out, batch_size=2,
                                       shard_size=4, progress=False)
    assert not leftover.exists()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    clean = DecompositionCache.build(tiny_bundle(), ToyDataset(10, preprocess=PREPROCESS), tmp_path / "clean",
                                     batch_size=2, shard_size=4, progress=False)
    assert_same_cache(resumed, clean)
    assert resumed.ids == ToyDataset(10, preprocess=PREPROCESS).ids


HOLD_LOCK = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.write(f"pid {os.getpid()} (test holder)")
handle.flush()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_writer_gets_a_clear_error(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CacheLockedError, match=rf"another run \(pid {holder.pid} \(test holder\)\).*Wait"):
            DecompositionCache.build(tiny_bundle(), ToyDataset(2, preprocess=PREPROCESS), out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the second run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    cache = DecompositionCache.build(tiny_bundle(), ToyDataset(2, preprocess=PREPROCESS), out, progress=False)
    assert len(cache) == 2  # the lock dies with its holder


def test_stale_cache_names_what_differs_and_is_left_alone(tmp_path):
    out = tmp_path / "c"
    cache = DecompositionCache.build(tiny_bundle(), ToyDataset(4, seed=0, preprocess=PREPROCESS), out, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    other_model = tiny_bundle()
    with torch.no_grad():
        other_model.model.visual.proj.mul_(2)
    with pytest.raises(StaleCacheError, match=r"model\.weights: cache has .*Delete the folder"):
        DecompositionCache.build(other_model, ToyDataset(4, seed=0, preprocess=PREPROCESS), out, progress=False)
    with pytest.raises(StaleCacheError, match=r"dataset\.images_sha256.*dataset\.seed: cache has 0, requested 1"):
        DecompositionCache.build(tiny_bundle(), ToyDataset(4, seed=1, preprocess=PREPROCESS), out, progress=False)
    bilinear = open_clip.image_transform(32, is_train=False, interpolation="bilinear")
    with pytest.raises(StaleCacheError, match=r"dataset\.preprocess: cache has"):
        DecompositionCache.build(tiny_bundle(), ToyDataset(4, seed=0, preprocess=bilinear), out, progress=False)
    with pytest.raises(StaleCacheError, match=r"reductions\.dtype"):
        DecompositionCache.build(tiny_bundle(), ToyDataset(4, seed=0, preprocess=PREPROCESS), out, dtype="float32",
                                 progress=False)
    wanted = json.loads(json.dumps(cache.key))
    wanted["model"]["spec"] = "ViT-B-16"
    with pytest.raises(StaleCacheError, match=r"model\.spec: cache has \"tiny\", requested \"ViT-B-16\""):
        DecompositionCache.open(out, expected_key=wanted)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")} == stamps
    with pytest.raises(FileExistsError, match="not a decomposition cache"):
        DecompositionCache.build(tiny_bundle(), ToyDataset(4, preprocess=PREPROCESS), tmp_path / "c" / "shard_00000",
                                 progress=False)
