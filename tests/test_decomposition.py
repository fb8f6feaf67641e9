"""The decomposition sums back to encode_image, and each term matches an independent calculation."""

from __future__ import annotations

import clipdecomp
import open_clip
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_clip


def reference_heads(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(layer, token, head) direct terms by the paper's formula, written out plainly.

    Runs the blocks by hand, takes attention weights from torch's own nn.MultiheadAttention
    (need_weights=True), builds every piece in residual space, and applies the frozen final LayerNorm
    piece by piece: y_k = (gamma * (x_k - s_k mu) / sigma + s_k beta) @ proj / ||y||.
    Returns (spatial heads [B, L, N, H, d'], normalised embedding [B, d']).
    """
    visual = model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], 1) + visual.positional_embedding)
    pieces = []  # [B, N, H, W] residual-space (token, head) pieces per layer
    for block in visual.transformer.resblocks:
        u = block.ln_1(x)
        attn = block.attn
        _, weights = attn(u, u, u, need_weights=True, average_attn_weights=False)  # [B, H, N, N]
        n_heads, width = attn.num_heads, attn.embed_dim
        head_dim = width // n_heads
        w_v, b_v = attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :]
        values = (u @ w_v.T + b_v).view(*u.shape[:2], n_heads, head_dim)  # [B, N, H, Dh]
        per_layer = torch.zeros(u.shape[0], u.shape[1], n_heads, width)
        for h in range(n_heads):
            w_o = attn.out_proj.weight[:, h * head_dim : (h + 1) * head_dim]  # [W, Dh]
            for i in range(u.shape[1]):
                term = weights[:, h, 0, i, None] * (values[:, i, h] @ w_o.T)
                per_layer[:, i, h] = block.ls_1(term + attn.out_proj.bias / (u.shape[1] * n_heads))
        pieces.append(per_layer)
        x = x + block.ls_1(attn(u, u, u, need_weights=False)[0])
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    r = x[:, 0]
    mu, sigma = (
        r.mean(-1, keepdim=True),
        torch.sqrt(r.var(-1, unbiased=False, keepdim=True) + visual.ln_post.eps),
    )
    y = visual.ln_post(r) @ visual.proj
    n_layers, n_tokens = len(pieces), pieces[0].shape[1]
    share = 1 / ((2 * n_layers + 1) * n_tokens * pieces[0].shape[2])
    out = []
    for piece in pieces:
        ln = (
            visual.ln_post.weight * (piece - share * mu[:, None, None]) / sigma[:, None, None]
            + share * visual.ln_post.bias
        )
        out.append(ln @ visual.proj / y.norm(dim=-1)[:, None, None, None])
    return torch.stack(out, 1), F.normalize(y, dim=-1)


def check_invariants(model, images, atol=1e-5):
    parts = clipdecomp.decompose(model, images)
    expected = F.normalize(model.encode_image(images).float(), dim=-1)
    torch.testing.assert_close(parts.total(), expected, atol=atol, rtol=0)
    torch.testing.assert_close(parts.heads.sum(2), parts.attns, atol=atol, rtol=0)
    stacked, labels = parts.stack("head")
    assert len(labels) == stacked.shape[1] == len(set(labels))
    torch.testing.assert_close(stacked.sum(1), expected, atol=atol, rtol=0)
    torch.testing.assert_close(
        parts.norm, model.encode_image(images).float().norm(dim=-1), atol=1e-4, rtol=1e-5
    )
    return parts


@torch.no_grad()
def test_terms_match_independent_calculation():
    model = tiny_clip(ls_init_value=0.5)
    images = torch.randn(3, 3, 32, 32)
    reference, embedding = reference_heads(model, images)
    parts = clipdecomp.decompose(model, images, spatial=True)
    torch.testing.assert_close(parts.heads, reference, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(parts.total(), embedding, atol=1e-5, rtol=0)
    torch.testing.assert_close(parts.cls_to_cls, reference[:, :, 0], atol=2e-6, rtol=1e-4)


@torch.no_grad()
def test_layer_level_shares_match_formula():
    """Embedding and MLP terms computed by the plain formula with share 1/(2L+1)."""
    model = tiny_clip()
    images = torch.randn(2, 3, 32, 32)
    visual, captured = model.visual, {}
    hooks = [
        visual.ln_pre.register_forward_hook(lambda m, i, o: captured.update(z0=o[:, 0])),
        visual.ln_post.register_forward_hook(lambda m, i, o: captured.update(r=i[0][:, 0])),
        visual.transformer.resblocks[1].ls_2.register_forward_hook(
            lambda m, i, o: captured.update(m1=o[:, 0])
        ),
    ]
    y = model.encode_image(images)
    for hook in hooks:
        hook.remove()
    r, s = captured["r"], 1 / 7
    mu, sigma = r.mean(-1, keepdim=True), torch.sqrt(r.var(-1, unbiased=False, keepdim=True) + 1e-5)
    ln = visual.ln_post
    for piece, got in ((captured["z0"], "embed"), (captured["m1"], "mlp_1")):
        expected = (
            (ln.weight * (piece - s * mu) / sigma + s * ln.bias) @ visual.proj / y.norm(dim=-1, keepdim=True)
        )
        torch.testing.assert_close(clipdecomp.decompose(model, images)[got], expected, atol=1e-6, rtol=1e-4)


@torch.no_grad()
def test_spatial_sums_to_heads_and_stack(vit_b32, images224):
    flat = clipdecomp.decompose(vit_b32, images224)
    spatial = clipdecomp.decompose(vit_b32, images224, spatial=True, layers=[-2, -1])
    assert spatial.heads.shape == (2, 2, 50, 12, 512) and spatial.head_layers == (10, 11)
    torch.testing.assert_close(spatial.heads.sum(2), flat.heads[:, 10:], atol=1e-6, rtol=0)
    torch.testing.assert_close(spatial.heads[:, :, 0], flat.cls_to_cls[:, 10:], atol=1e-7, rtol=0)
    patches, labels = spatial.stack("patch")
    assert (
        patches.shape[1] == len(labels) == 1 + 12 + 10 + 2 * 50 * 12
    )  # embed, MLPs, plain layers, (token, head) pairs
    torch.testing.assert_close(patches.sum(1), flat.total(), atol=1e-5, rtol=0)
    layer_stack, layer_labels = flat.stack("layer")
    assert layer_labels[:3] == ["embed", "attn_0", "mlp_0"] and layer_stack.shape[1] == 25
    torch.testing.assert_close(flat["L11H3"], flat.heads[:, 11, 3])


@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-16"])
@torch.no_grad()
def test_invariants_random_init(arch):
    torch.manual_seed(0)
    bundle = clipdecomp.load(arch)
    check_invariants(bundle.model, torch.randn(2, 3, 224, 224))


@torch.no_grad()
def test_invariants_quickgelu_openai_config():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-quickgelu").eval()
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    check_invariants(model, torch.randn(2, 3, 224, 224))


@pytest.mark.slow
@torch.no_grad()
def test_invariants_vit_l14():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-L-14").eval()
    parts = check_invariants(model, torch.randn(1, 3, 224, 224))
    assert parts.heads.shape == (1, 24, 16, 768)


@torch.no_grad()
def test_bf16_model_accumulates_in_fp32():
    model = tiny_clip().to(torch.bfloat16)
    images = torch.randn(2, 3, 32, 32)
    parts = clipdecomp.decompose(model, images)
    assert parts.total().dtype == torch.float32
    expected = F.normalize(model.encode_image(images.to(torch.bfloat16)).float(), dim=-1)
    torch.testing.assert_close(parts.total(), expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: open_clip.create_model("RN50"),
        lambda: tiny_clip(pool_type="avg"),
        lambda: tiny_clip(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
        lambda: tiny_clip(qk_norm=True),
    ],
    ids=["resnet", "avg-pool", "attentional-pool", "custom-block"],
)
def test_unsupported_towers_raise(build):
    with pytest.raises(NotImplementedError, match="supported"):
        clipdecomp.decompose(build(), torch.randn(1, 3, 32, 32))


def test_bad_images_and_layers():
    model = tiny_clip()
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        clipdecomp.decompose(model, torch.randn(1, 3, 64, 64))
    with pytest.raises(TypeError, match="float"):
        clipdecomp.decompose(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        clipdecomp.decompose(model, torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(IndexError, match="3 layers"):
        clipdecomp.decompose(model, torch.randn(1, 3, 32, 32), layers=[5])
    parts = clipdecomp.decompose(model, torch.randn(1, 3, 32, 32), layers=[])
    assert parts.heads.shape == (1, 0, 4, 24)
    with pytest.raises(ValueError, match="spatial"):
        parts.stack("patch")


@torch.no_grad()
def test_cached_output_maps_follow_weight_edits():
    model = tiny_clip()
    images = torch.randn(2, 3, 32, 32)
    clipdecomp.decompose(model, images)  # fills the per-block cache
    model.visual.transformer.resblocks[2].attn.out_proj.weight.mul_(1.5)
    model.visual.proj.add_(0.1)
    check_invariants(model, images)
    parts = clipdecomp.decompose(model, images)
    torch.testing.assert_close(parts.heads.sum(2), parts.attns, atol=1e-5, rtol=0)


@torch.no_grad()
def test_invariants_on_the_shipped_toy_model():
    from clipdecomp import toy

    bundle = clipdecomp.load("toy")
    images = bundle.preprocess_batch(toy.sample(8, seed=99, split="uniform").images)
    parts = check_invariants(bundle.model, images)
    spatial = clipdecomp.decompose(bundle, images, spatial=True)
    torch.testing.assert_close(spatial.heads.sum(2), parts.heads, atol=1e-5, rtol=0)


@torch.no_grad()
def test_preallocated_per_patch_terms_equal_the_general_path(monkeypatch):
    """The per-patch path that writes each layer into one preallocated result (per-image scale folded
    into the values) gives the terms of the general path that builds each layer and stacks them."""
    from clipdecomp.decomposition import _LayerReader

    model = tiny_clip(ls_init_value=0.5)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    fast = [clipdecomp.decompose(model, images, spatial=True, layers=layers) for layers in (None, [0, 2])]
    monkeypatch.setattr(
        _LayerReader,
        "write_patch_terms",
        lambda self, readout, share, out: out.copy_(self.head_terms(readout, share)),
    )
    general = [clipdecomp.decompose(model, images, spatial=True, layers=layers) for layers in (None, [0, 2])]
    for new, old in zip(fast, general):
        assert new.heads.shape == old.heads.shape and new.heads.is_contiguous()
        torch.testing.assert_close(new.heads, old.heads, atol=1e-7, rtol=1e-5)
    reference, _ = reference_heads(model, images)  # and both are the paper's formula
    torch.testing.assert_close(fast[0].heads, reference, atol=2e-6, rtol=1e-4)
