"""DecompositionCache: the stored terms equal decompose(), rows keep their ids and labels, reopen and CLI."""

from __future__ import annotations

import json

import clipdecomp
import numpy as np
import open_clip
import pytest
import torch
from clipdecomp.__main__ import main, parse_layers
from clipdecomp.cache import DecompositionCache, ShardedArray
from clipdecomp.datasets import ToyDataset
from safetensors.torch import save_file

from conftest import tiny_clip

torch.set_num_threads(1)

PREPROCESS = open_clip.image_transform(32, is_train=False)
TINY_TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)


def tiny_bundle(**vision_overrides) -> clipdecomp.ClipBundle:
    """conftest's tiny CLIP (seeded, so equal across calls and processes) with a 32 px preprocess."""
    return clipdecomp.ClipBundle(
        model=tiny_clip(**vision_overrides),
        preprocess=PREPROCESS,
        tokenizer=open_clip.get_tokenizer("ViT-B-32", context_length=16),
        spec="tiny",
    )


def reference(bundle, data, rows, **kwargs) -> clipdecomp.Decomposition:
    return clipdecomp.decompose(bundle, torch.stack([data.image(int(i)) for i in rows]), **kwargs)


def test_cache_equals_decompose_with_labels_and_ids(tmp_path):
    bundle, data = tiny_bundle(), ToyDataset(10, seed=0, preprocess=PREPROCESS, split="test_groups")
    texts = torch.nn.functional.normalize(
        torch.randn(5, 24, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    cache = DecompositionCache.build(
        bundle,
        data,
        tmp_path / "c",
        batch_size=3,
        shard_size=4,
        layers=[1, 2],
        text_directions=texts,
        text_labels=list("abcde"),
        progress=False,
    )
    ref = reference(bundle, data, range(10), spatial=True, layers=[1, 2])
    assert len(cache) == 10 and len(cache.heads.parts) == 3 and cache.head_layers == (1, 2)
    assert cache.heads.dtype == np.float16 and cache.norm.dtype == np.float32
    fp16 = dict(atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(cache.embedding[:], ref.embedding, **fp16)
    np.testing.assert_allclose(cache.attns[:], ref.attns, **fp16)
    np.testing.assert_allclose(cache.mlps[:], ref.mlps, **fp16)
    np.testing.assert_allclose(cache.heads[:], ref.head_terms(), **fp16)
    np.testing.assert_allclose(cache.cls_to_cls[:], ref.cls_to_cls.sum(2), **fp16)
    np.testing.assert_allclose(cache.norm[:], ref.norm, rtol=1e-5)
    np.testing.assert_allclose(cache.patch_text[:], torch.einsum("blnhd,td->blnt", ref.heads, texts), **fp16)
    np.testing.assert_allclose(
        cache.total(), bundle.encode_image(torch.stack([data.image(i) for i in range(10)])), atol=1e-2
    )
    assert cache.ids == data.ids and cache.indices.tolist() == list(range(10))
    for name, values in data.labels.items():
        assert cache.labels[name].tolist() == values.tolist()
    assert cache.text_labels == list("abcde")
    np.testing.assert_array_equal(cache.text_directions, texts.numpy())
    # mean() accumulates the stored fp16 values in high precision
    np.testing.assert_allclose(
        cache.mean("heads"), np.asarray(cache.heads, dtype=np.float64).mean(0), rtol=1e-6, atol=1e-8
    )
    assert cache.mean("heads").dtype == np.float32


def test_to_decomposition_supports_ablation_like_decompose(tmp_path):
    from clipdecomp.ablation import all_mlps, cls_terms, heads_of, mean_ablate

    bundle, data = tiny_bundle(), ToyDataset(6, seed=3, preprocess=PREPROCESS)
    cache = DecompositionCache.build(
        bundle, data, tmp_path / "c", layers=[-1], dtype="float32", shard_size=4, progress=False
    )
    ref = reference(bundle, data, range(6), layers=[-1])
    parts = cache.to_decomposition()
    assert (
        parts.grid_size == ref.grid_size
        and parts.head_layers == ref.head_layers
        and parts.cls_to_cls.shape[2] == 1
    )
    np.testing.assert_allclose(parts.total(), ref.total(), atol=1e-6)
    n_layers = ref.n_layers
    for ablate in (all_mlps(n_layers), cls_terms(n_layers), heads_of([(n_layers - 1, 0)])):
        np.testing.assert_allclose(mean_ablate(parts, ablate), mean_ablate(ref, ablate), atol=1e-6)
    np.testing.assert_allclose(cache.to_decomposition([4, 1]).heads, ref.heads[[4, 1]], atol=1e-6)


@pytest.mark.parametrize("detail, einsum", [("head", "blnhd,td->blnht"), ("sum", "blnhd,td->bnt")])
def test_patch_detail_reductions(tmp_path, detail, einsum):
    bundle, data = tiny_bundle(), ToyDataset(3, seed=1, preprocess=PREPROCESS)
    texts = torch.randn(2, 24)
    cache = DecompositionCache.build(
        bundle,
        data,
        tmp_path / "c",
        layers=[-1],
        text_directions=texts,
        patch_detail=detail,
        dtype="float32",
        progress=False,
    )
    ref = reference(bundle, data, range(3), spatial=True, layers=[-1])
    np.testing.assert_allclose(
        cache.patch_text[:], torch.einsum(einsum, ref.heads, texts), atol=1e-6, rtol=1e-5
    )
    np.testing.assert_allclose(cache.heads[:], ref.head_terms(), atol=1e-6, rtol=1e-5)


def test_selected_indices_keep_their_order_ids_and_labels(tmp_path):
    bundle, data = tiny_bundle(), ToyDataset(9, seed=2, preprocess=PREPROCESS)
    rows = [7, 2, 5, 0]
    cache = DecompositionCache.build(
        bundle, data, tmp_path / "c", indices=rows, shard_size=3, layers=[], dtype="float32", progress=False
    )
    assert cache.indices.tolist() == rows and cache.ids == [data.ids[i] for i in rows]
    assert cache.labels["shape"].tolist() == data.labels["shape"][rows].tolist()
    np.testing.assert_allclose(cache.attns[:], reference(bundle, data, rows).attns, atol=1e-6)
    assert cache.heads.shape == (4, 0, 4, 24)


def test_worker_processes_give_the_same_cache(tmp_path):
    bundle, data = tiny_bundle(), ToyDataset(6, seed=4, preprocess=PREPROCESS)
    serial = DecompositionCache.build(
        bundle, data, tmp_path / "a", batch_size=2, shard_size=4, progress=False
    )
    parallel = DecompositionCache.build(
        bundle, data, tmp_path / "b", batch_size=2, shard_size=4, num_workers=2, progress=False
    )
    assert parallel.ids == serial.ids
    np.testing.assert_array_equal(parallel.heads[:], serial.heads[:])


def test_rebuild_reuses_and_open_reads(tmp_path):
    bundle, data = tiny_bundle(), ToyDataset(5, seed=0, preprocess=PREPROCESS)
    first = DecompositionCache.build(bundle, data, tmp_path / "c", shard_size=2, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("shard_*/*.npy")}
    again = DecompositionCache.build(bundle, data, tmp_path / "c", shard_size=2, progress=False)
    assert {
        p: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("shard_*/*.npy")
    } == stamps  # nothing rewritten
    opened = DecompositionCache.open(tmp_path / "c", expected_key=first.key)
    np.testing.assert_array_equal(opened.heads[:], again.heads[:])
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["status"] == "complete"


def test_sharded_array_indexing_matches_concatenation():
    parts = [
        np.arange(12.0).reshape(3, 4),
        np.arange(12.0, 20.0).reshape(2, 4),
        np.arange(20.0, 28.0).reshape(2, 4),
    ]
    array, whole = ShardedArray(parts), np.concatenate(parts)
    assert array.shape == (7, 4) and len(array) == 7
    for key in (
        2,
        -1,
        slice(1, 6),
        slice(None, None, -2),
        [6, 0, 3],
        np.array([True, False] * 3 + [True]),
        (slice(None), 2),
        (4, slice(1, 3)),
        ([5, 1], 0),
    ):
        np.testing.assert_array_equal(array[key], whole[key])
    np.testing.assert_array_equal(np.asarray(array), whole)
    np.testing.assert_allclose(array.mean(), whole.mean(0))
    assert [start for start, _ in array.chunks(rows=2)] == [0, 2, 3, 5]
    with pytest.raises(IndexError, match="out of range"):
        array[7]


def test_parse_layers():
    assert parse_layers("all") is None and parse_layers("none") == []
    assert (
        parse_layers("-4:") == [-4, -3, -2, -1]
        and parse_layers("8:10") == [8, 9]
        and parse_layers("1,3") == [1, 3]
    )


def save_tiny_local_dir(folder) -> None:
    """The tiny model in open_clip's local-dir layout, so the CLI can load it by path."""
    folder.mkdir()
    vision = dict(image_size=32, patch_size=8, width=64, layers=3, head_width=16)
    (folder / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": {"embed_dim": 24, "vision_cfg": vision, "text_cfg": TINY_TEXT},
                "preprocess_cfg": {
                    "mean": list(open_clip.OPENAI_DATASET_MEAN),
                    "std": list(open_clip.OPENAI_DATASET_STD),
                },
            }
        )
    )
    save_file(
        {k: v.contiguous() for k, v in tiny_clip().state_dict().items()},
        folder / "open_clip_model.safetensors",
    )


def test_cli_builds_resumes_and_reports_errors(tmp_path, capsys):
    save_tiny_local_dir(tmp_path / "model")
    args = [
        "decompose",
        "--model",
        str(tmp_path / "model"),
        "--data",
        "toy:test_groups",
        "--n-images",
        "6",
        "--out",
        str(tmp_path / "c"),
        "--batch-size",
        "4",
        "--shard-size",
        "4",
        "--no-progress",
    ]
    main(args + ["--layers=-1:"])
    assert "6 images" in capsys.readouterr().out
    cache = DecompositionCache.open(tmp_path / "c")
    assert cache.head_layers == (2,) and cache.labels["group"].tolist() == [0, 1, 2, 3, 0, 1]
    main(args + ["--layers", "2"])  # a rerun of a finished cache is a no-op
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--layers", "1,2"])
    assert exit_info.value.code == 2
    assert "reductions.head_layers" in capsys.readouterr().err
