"""Mean ablation: cached (frozen LayerNorm) and real intervention, against plain calculations."""

from __future__ import annotations

import clipdecomp
import pytest
import torch
import torch.nn.functional as F
from clipdecomp.ablation import all_mlps, attention_layers, cls_terms, heads_of, intervene, mean_ablate

from conftest import tiny_clip


@pytest.fixture(scope="module")
def model_and_images():
    model = tiny_clip()
    return model, torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_cached_ablation_replaces_by_mean(model_and_images):
    model, images = model_and_images
    parts = clipdecomp.decompose(model, images)
    got = mean_ablate(parts, ["L1H2", "mlp_0"])
    head, mlp = parts.heads[:, 1, 2], parts.mlps[:, 0]
    torch.testing.assert_close(got, parts.total() - head + head.mean(0) - mlp + mlp.mean(0))
    cls = mean_ablate(parts, cls_terms(3))
    torch.testing.assert_close(
        cls, parts.total() - parts.cls_to_cls.sum((1, 2)) + parts.cls_to_cls.sum((1, 2)).mean(0)
    )


def test_ablating_everything_leaves_the_mean_embedding(model_and_images):
    model, images = model_and_images
    parts = clipdecomp.decompose(model, images)
    everything = all_mlps(3) + attention_layers(range(3))
    got = mean_ablate(parts, everything)
    torch.testing.assert_close(got, parts.total().mean(0).expand_as(got), atol=1e-6, rtol=0)


def test_bad_labels(model_and_images):
    model, images = model_and_images
    parts = clipdecomp.decompose(model, images, layers=[2])
    with pytest.raises(ValueError, match="Unknown component"):
        mean_ablate(parts, ["head_3"])
    with pytest.raises(IndexError, match="3 layers"):
        mean_ablate(parts, ["mlp_7"])
    with pytest.raises(IndexError, match="4 heads"):
        mean_ablate(parts, ["L2H9"])
    with pytest.raises(ValueError, match="no head detail"):
        mean_ablate(parts, ["L0H1"])


def _last_layer_reference(model, images, which: str, head: int = 0) -> torch.Tensor:
    """Mean-ablate a last-layer piece at the CLS position by hand (only the CLS row reaches the output)."""
    visual, captured = model.visual, {}
    last = visual.transformer.resblocks[-1]
    hooks = [
        visual.ln_post.register_forward_hook(lambda m, i, o: captured.update(r=i[0][:, 0])),
        last.ln_1.register_forward_hook(lambda m, i, o: captured.update(u=o)),
        last.ls_1.register_forward_hook(lambda m, i, o: captured.update(a=o[:, 0])),
        last.ls_2.register_forward_hook(lambda m, i, o: captured.update(m=o[:, 0])),
    ]
    model.encode_image(images)
    for hook in hooks:
        hook.remove()
    if which == "head":
        u, attn = captured["u"], last.attn
        _, weights = attn(u, u, u, need_weights=True, average_attn_weights=False)
        dh = attn.embed_dim // attn.num_heads
        values = u @ attn.in_proj_weight[2 * attn.embed_dim :].T + attn.in_proj_bias[2 * attn.embed_dim :]
        out = torch.einsum("bn,bnd->bd", weights[:, head, 0], values[..., head * dh : (head + 1) * dh])
        piece = out @ attn.out_proj.weight[:, head * dh : (head + 1) * dh].T
    elif which == "attn":
        piece = captured["a"]
    else:
        r = captured["r"] - captured["m"] + captured["m"].mean(0)
        return F.normalize(visual.ln_post(r) @ visual.proj, dim=-1)
    middle = (
        captured["r"] - captured["m"] - piece + piece.mean(0)
    )  # the last MLP then reads the edited stream
    r = middle + last.ls_2(last.mlp(last.ln_2(middle)))
    return F.normalize(visual.ln_post(r) @ visual.proj, dim=-1)


@pytest.mark.parametrize("which,label", [("head", "L2H1"), ("attn", "attn_2"), ("mlp", "mlp_2")])
@torch.no_grad()
def test_intervention_on_last_layer_matches_hand_calculation(model_and_images, which, label):
    model, images = model_and_images
    expected = _last_layer_reference(model, images, which, head=1)
    torch.testing.assert_close(intervene(model, images, [label], batch_size=4), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_intervention_is_identity_on_identical_images(model_and_images):
    model, images = model_and_images
    same = images[:1].expand(4, -1, -1, -1).contiguous()
    clean = F.normalize(model.encode_image(same), dim=-1)
    labels = ["embed", "mlp_0", "attn_1", "L0H3", "cls_2"] + heads_of([(2, 0)])
    torch.testing.assert_close(intervene(model, same, labels), clean, atol=1e-5, rtol=0)


@torch.no_grad()
def test_intervention_changes_early_layers_more_than_cached_view(model_and_images):
    """Early-layer ablation has indirect effects, so the real intervention differs from the cached one."""
    model, images = model_and_images
    parts = clipdecomp.decompose(model, images)
    cached = F.normalize(mean_ablate(parts, ["attn_0"]), dim=-1)
    real = intervene(model, images, ["attn_0"])
    assert (cached - real).abs().max() > 1e-3


@torch.no_grad()
def test_intervention_reads_a_dataloader_lazily_and_refuses_one_shot_iterators(model_and_images):
    model, images = model_and_images
    labels = ["L1H0", "mlp_0", "cls_1"]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images),
        batch_size=3,
        collate_fn=lambda items: torch.stack([x for (x,) in items]),
    )
    torch.testing.assert_close(
        intervene(model, loader, labels), intervene(model, images, labels, batch_size=5), atol=1e-5, rtol=0
    )
    with pytest.raises(TypeError, match="reads the batches twice"):
        intervene(model, (b for b in images.split(2)), labels)
