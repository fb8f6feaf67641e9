"""Tar-shard (webdataset) datasets: streamed samples, corrupt ones skipped or refused, caches built by one or
two ranks, resumed after a killed rank, and the ``wds:`` command line. The shards are written here."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time
from pathlib import Path

import clipdecomp
import numpy as np
import pytest
import torch
from clipdecomp import toy
from clipdecomp.__main__ import main
from clipdecomp.cache import DecompositionCache, StaleCacheError
from clipdecomp.datasets import TarShardDataset, load_rgb
from PIL import Image
from test_cache import PREPROCESS, tiny_bundle
from test_distributed import records, run_ranks

torch.set_num_threads(1)

SHARDS = (5, 4, 3)  # samples per tar
CORRUPT = "000001.tar/s0006"  # a sample whose .png is not an image
BUILD = dict(batch_size=2, progress=False)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Three tar shards of toy images with .cls labels and .txt captions; one sample's .png is garbage."""
    root = tmp_path_factory.mktemp("wds")
    world = toy.sample(sum(SHARDS), seed=3, split="uniform")
    number = 0
    for shard, count in enumerate(SHARDS):
        members = []
        for _ in range(count):
            key = f"s{number:04d}"
            image = b"not a png at all" if f"{shard:06d}.tar/{key}" == CORRUPT else png(world.images[number])
            members += [
                (f"{key}.png", image),
                (f"{key}.cls", str(world.attributes["label"][number]).encode()),
                (f"{key}.txt", f"toy image {number}".encode()),
            ]
            number += 1
        write_tar(root / f"{shard:06d}.tar", members)
    return root


def dataset(root: Path, **options) -> TarShardDataset:
    return TarShardDataset(
        f"{root}/{{000000..000002}}.tar", PREPROCESS, labels=["cls"], captions=["txt"], **options
    )


def test_tar_shards_build_a_cache_with_ids_labels_captions_and_skipped_samples(shards, tmp_path):
    bundle, world = tiny_bundle(), toy.sample(sum(SHARDS), seed=3, split="uniform")
    with pytest.warns(
        UserWarning, match=rf"1 corrupt sample\(s\) were skipped: {CORRUPT} \(its \.png does not decode"
    ):
        cache = DecompositionCache.build(bundle, dataset(shards), tmp_path / "c", layers=[1, 2], **BUILD)
    good = [i for i in range(sum(SHARDS)) if i != 6]
    assert (
        len(cache) == 11
        and cache.manifest["n_shards"] == 3
        and [len(p) for p in cache.heads.parts] == [5, 3, 3]
    )
    assert cache.ids[:2] == ["000000.tar/s0000", "000000.tar/s0001"] and CORRUPT not in cache.ids
    assert cache.indices.tolist() == [0, 1, 2, 3, 4, 0, 2, 3, 0, 1, 2]  # positions within each tar
    assert cache.labels["cls"].tolist() == world.attributes["label"][good].tolist()
    assert cache.captions["txt"] == [f"toy image {i}" for i in good]
    assert cache.skipped == [(CORRUPT, cache.skipped[0][1])] and "does not decode" in cache.skipped[0][1]
    images = torch.stack([PREPROCESS(load_rgb(io.BytesIO(png(world.images[i])))) for i in good])
    reference = clipdecomp.decompose(
        bundle, images, layers=[1, 2]
    )  # an independent pass over the same pixels
    np.testing.assert_allclose(cache.heads[:], reference.head_terms(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(cache.total(), bundle.encode_image(images), atol=1e-2)
    again = DecompositionCache.build(bundle, dataset(shards), tmp_path / "c", layers=[1, 2], **BUILD)
    assert records(again.folder) == records(cache.folder)  # reused as it is


def test_strict_mode_names_the_corrupt_sample_and_keeps_whole_shards(shards, tmp_path):
    with pytest.raises(ValueError, match=rf"Sample {CORRUPT} of .*000001\.tar is corrupt.*strict=False"):
        DecompositionCache.build(tiny_bundle(), dataset(shards, strict=True), tmp_path / "c", **BUILD)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["manifest.json", "shard_00000"]


class DyingShards(TarShardDataset):
    """Tar shards whose process SIGKILLs itself in shard ``kill_in``, once ``wait_for`` exists."""

    kill_in: int | None = None
    wait_for: Path | None = None

    def samples(self, shard, skipped=None):
        for number, sample in enumerate(super().samples(shard, skipped)):
            if shard == self.kill_in and number == 1:
                while not self.wait_for.exists():
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
            yield sample


def test_tar_shards_split_across_two_ranks_and_resume_after_a_kill(shards, tmp_path):
    bundle = tiny_bundle()
    with pytest.warns(UserWarning, match="1 corrupt sample"):
        single = DecompositionCache.build(bundle, dataset(shards), tmp_path / "one", **BUILD)
    outcomes = run_ranks(
        2,
        lambda rank: len(DecompositionCache.build(bundle, dataset(shards), tmp_path / "two", **BUILD)),
        tmp_path,
    )
    assert outcomes == [("ok", 11), ("ok", 11)]
    assert records(tmp_path / "two") == records(single.folder)  # bitwise the one-process files

    out = tmp_path / "killed"

    def killed_job(rank: int) -> None:  # rank 0 has tars 0 and 2, rank 1 tar 1; rank 0 dies in tar 2
        data = DyingShards(f"{shards}/{{000000..000002}}.tar", PREPROCESS, labels=["cls"], captions=["txt"])
        data.kill_in, data.wait_for = (2 if rank == 0 else None), out / "journal_rank00001.json"
        DecompositionCache.build(bundle, data, out, **BUILD)

    assert run_ranks(2, killed_job, tmp_path) == [("killed", None)] * 2
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000", "shard_00001"]
    kept = {p: p.stat().st_mtime_ns for p in out.glob("shard_*/*.npy")}
    with pytest.warns(UserWarning, match="1 corrupt sample"):
        resumed = DecompositionCache.build(bundle, dataset(shards), out, **BUILD)  # one process now
    assert {
        p: p.stat().st_mtime_ns for p in kept
    } == kept  # rank 1's tar (from its journal) and rank 0's first kept
    assert records(out) == records(single.folder) and resumed.skipped == single.skipped


def test_iterating_splits_shards_across_ranks_and_names_a_truncated_tar(shards, tmp_path):
    def read(rank: int) -> list[str]:
        return [sample.id for sample in dataset(shards)]

    with pytest.warns(UserWarning, match="Skipped 1 corrupt"):
        everything = [sample.id for sample in dataset(shards)]
    outcomes = run_ranks(2, read, tmp_path)
    assert [kind for kind, _ in outcomes] == ["ok", "ok"]
    first, second = outcomes[0][1], outcomes[1][1]
    assert (
        not set(first) & set(second)
        and sorted(first + second) == sorted(everything)
        and len(everything) == 11
    )

    whole = (shards / "000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) * 3 // 5])  # a download cut short
    cut = TarShardDataset(tmp_path / "cut.tar", PREPROCESS, labels=["cls"])
    skipped: list = []
    kept = [sample.id for sample in cut.samples(0, skipped)]
    assert 1 <= len(kept) < 5 and skipped and "cut.tar/" in skipped[-1][0]
    assert any(
        "unreadable from here" in reason or "no .cls" in reason or "does not decode" in reason
        for _, reason in skipped
    )
    with pytest.raises(ValueError, match=r"cut\.tar"):
        list(TarShardDataset(tmp_path / "cut.tar", PREPROCESS, labels=["cls"], strict=True).samples(0))


def test_changed_tar_is_a_stale_cache(shards, tmp_path):
    copy = tmp_path / "shards"
    copy.mkdir()
    for path in shards.glob("*.tar"):
        (copy / path.name).write_bytes(path.read_bytes())
    bundle = tiny_bundle()
    with pytest.warns(UserWarning):
        DecompositionCache.build(bundle, dataset(copy), tmp_path / "c", **BUILD)
    os.utime(copy / "000002.tar", ns=(0, 10**9))
    with pytest.raises(StaleCacheError, match="dataset.shards_sha256"):
        DecompositionCache.build(bundle, dataset(copy), tmp_path / "c", **BUILD)


def test_cli_reads_wds_patterns_and_refuses_options_that_do_not_apply(shards, tmp_path, capsys):
    out = tmp_path / "c"
    base = ["decompose", "--model", "toy", "--data", f"wds:{shards}/{{000000..000002}}.tar", "--no-progress"]
    with pytest.warns(UserWarning, match="1 corrupt"):
        main(base + ["--label-keys", "cls", "--caption-keys", "txt", "--out", str(out)])
    assert "11 images" in capsys.readouterr().out
    assert DecompositionCache.open(out).captions["txt"][0] == "toy image 0"
    for extra, message in (
        (["--n-images", "4"], "--n-images does not apply to tar shards"),
        (["--shard-size", "4"], "--shard-size does not apply to tar shards"),
    ):
        with pytest.raises(SystemExit):
            main(base + extra + ["--out", str(tmp_path / "d")])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "decompose",
                "--model",
                "toy",
                "--data",
                "toy",
                "--label-keys",
                "cls",
                "--out",
                str(tmp_path / "d"),
            ]
        )
    assert "--label-keys applies to tar shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--out", str(tmp_path / "d")] + ["--data", f"wds:{shards}/{{000000..000009}}.tar"])
    assert "000003.tar does not exist" in capsys.readouterr().err and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "shards_arg, options, error, match",
    [
        ("{root}/missing.tar", {}, FileNotFoundError, r"missing\.tar does not exist"),
        ("{root}", {}, IsADirectoryError, "is a folder, not a tar shard"),
        (["{root}/000000.tar", "{root}/000000.tar"], {}, ValueError, "same tar file twice"),
        (
            "{root}/000000.tar",
            {"labels": ["cls"], "captions": ["cls"]},
            ValueError,
            "both as a label and as a caption",
        ),
        ("{root}/000000.tar", {"labels": ["../x"]}, ValueError, "is not a sidecar extension"),
        ("{root}/000000.tar", {"labels": "cls"}, TypeError, "list"),
        ("http://host/000000.tar", {}, ValueError, "only local tar files"),
        (3, {}, TypeError, "brace pattern"),
    ],
    ids=["missing", "folder", "repeated", "label-and-caption", "bad-key", "keys-string", "url", "not-a-path"],
)
def test_tar_dataset_refuses_bad_arguments(shards, shards_arg, options, error, match):
    if isinstance(shards_arg, str):
        shards_arg = shards_arg.format(root=shards)
    elif isinstance(shards_arg, list):
        shards_arg = [name.format(root=shards) for name in shards_arg]
    with pytest.raises(error, match=match):
        TarShardDataset(shards_arg, PREPROCESS, **options)


def test_build_refuses_indices_and_shard_size_for_tar_shards(shards, tmp_path):
    for option in ({"indices": [0, 1]}, {"shard_size": 4}):
        with pytest.raises(ValueError, match="does not apply to TarShardDataset"):
            DecompositionCache.build(tiny_bundle(), dataset(shards), tmp_path / "c", **BUILD, **option)
    assert not (tmp_path / "c").exists()
    assert json.loads(json.dumps(dataset(shards).content_key()))["n_shards"] == 3
