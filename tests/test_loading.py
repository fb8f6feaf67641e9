"""load(): every spec form, offline failures that are fast and say what to do, safe checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

import clipdecomp
import open_clip
import pytest
import torch
from clipdecomp.loading import WeightsUnavailableError
from safetensors.torch import save_file


def test_architecture_spec_random_init(vit_b32):
    assert not vit_b32.model.training
    text = vit_b32.encode_text(["a photo of a cat", "a dog"])
    assert text.shape == (2, 512)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert vit_b32.weights_sha256 is None


def test_bad_specs_name_the_fix():
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        clipdecomp.load("ViT-Q-99")
    with pytest.raises(ValueError, match="Known tags"):
        clipdecomp.load("ViT-B-16/not_a_tag")
    with pytest.raises(ValueError, match="non-empty"):
        clipdecomp.load("")
    with pytest.raises(TypeError, match="list of strings"):
        clipdecomp.load("ViT-B-32").encode_text("one string")


def test_pretrained_tag_offline_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="Colab") as info:
        clipdecomp.load("ViT-B-16/laion2b_s34b_b88k", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    assert "checkpoint=" in str(info.value)


class Payload:
    """An arbitrary pickled object: torch.load(weights_only=True) must refuse it."""


def _fake_hub_cache(root: Path, repo_id: str, state: dict) -> None:
    """Lay out a Hugging Face hub cache holding `state` as open_clip_model.safetensors."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "open_clip_model.safetensors")


def test_cached_pretrained_tag_uses_tag_config(tmp_path):
    """A cached OpenAI tag loads offline with QuickGELU and the tag's normalisation."""
    torch.manual_seed(0)
    source = open_clip.create_model("ViT-B-32-quickgelu")
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    _fake_hub_cache(tmp_path, cfg["hf_hub"].rstrip("/"), source.state_dict())
    bundle = clipdecomp.load("ViT-B-32/openai", cache_dir=str(tmp_path))
    assert isinstance(bundle.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    normalize = bundle.preprocess.transforms[-1]
    assert tuple(normalize.mean) == pytest.approx(cfg["mean"])
    torch.testing.assert_close(bundle.model.visual.proj, source.visual.proj)


def test_checkpoint_file_and_local_dir(tmp_path):
    torch.manual_seed(0)
    source = open_clip.create_model("ViT-B-32")
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    for bundle in (clipdecomp.load("ViT-B-32", checkpoint=path), clipdecomp.load(f"ViT-B-32/{path}")):
        torch.testing.assert_close(bundle.model.visual.proj, source.visual.proj)
        assert bundle.weights_sha256 and len(bundle.weights_sha256) == 64


def test_corrupt_truncated_and_pickled_checkpoints_refused(tmp_path):
    torch.manual_seed(0)
    source = open_clip.create_model("ViT-B-32")
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="may be truncated, corrupt"):
        clipdecomp.load("ViT-B-32", checkpoint=truncated)

    pickled = tmp_path / "untrusted.pt"
    torch.save({"state_dict": Payload()}, pickled)
    with pytest.raises(ValueError, match="weights_only=True"):
        clipdecomp.load("ViT-B-32", checkpoint=pickled)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clipdecomp.load("ViT-B-32", checkpoint=tmp_path / "missing.pt")


def test_unknown_precision_is_refused_before_loading():
    import clipdecomp

    with pytest.raises(ValueError, match="precision must be one of fp32, fp16"):
        clipdecomp.load("toy", precision="fp33")
