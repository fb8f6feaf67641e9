"""The same exact decomposition on Hugging Face CLIP and on SigLIP's attention-pool towers (timm and HF).

Offline and random-init throughout: tiny open_clip / timm towers have their weights copied into the
transformers classes (``towers.hugging_face_twin``), so the same pixels must give the same embeddings
and the same terms on every backend. The attention-pool decomposition is also checked against a plain
per-token calculation.
"""

from __future__ import annotations

import io
import time

import clipdecomp
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from clipdecomp import loading, segmentation
from clipdecomp.ablation import intervene, mean_ablate
from clipdecomp.towers import hugging_face_twin, vision_tower
from transformers import (
    CLIPImageProcessor,
    CLIPVisionModelWithProjection,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipTextConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from conftest import tiny_clip

FIELDS = ("embedding", "attns", "mlps", "heads", "cls_to_cls", "norm")


def jitter(model: torch.nn.Module, scale: float = 0.2, seed: int = 1) -> torch.nn.Module:
    """Move every parameter off its initial value, so that no term is trivially zero or constant."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def tiny_timm_siglip() -> torch.nn.Module:
    """timm's SigLIP ViT (attention pool, no CLS token), shrunk: 3 layers, 4 heads, width 64, 32 px."""
    torch.manual_seed(0)
    trunk = timm.create_model(
        "vit_base_patch16_siglip_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=3,
        num_heads=4,
    )
    return jitter(trunk)


def tiny_hf_siglip(**overrides) -> torch.nn.Module:
    """A one-layer transformers SiglipVisionModel (width 32, 2 heads, 32 px) with config overrides."""
    config = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return SiglipVisionModel(SiglipVisionConfig(**config, image_size=32, patch_size=8, **overrides))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def clip_pair():
    model = jitter(tiny_clip(), scale=0.05)
    return model, hugging_face_twin(model)


@pytest.fixture(scope="module")
def siglip_pair():
    trunk = tiny_timm_siglip()
    return trunk, hugging_face_twin(trunk)


def assert_same_terms(a, b, atol=1e-5):
    for name in FIELDS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- HF CLIP


@pytest.mark.parametrize("spatial", [False, True])
@torch.no_grad()
def test_hf_clip_gives_open_clips_embedding_and_terms(clip_pair, images, spatial):
    model, hf = clip_pair
    torch.testing.assert_close(
        hf(pixel_values=images).image_embeds, model.encode_image(images), atol=1e-5, rtol=0
    )
    ours, theirs = (
        clipdecomp.decompose(model, images, spatial=spatial),
        clipdecomp.decompose(hf, images, spatial=spatial),
    )
    assert_same_terms(ours, theirs)
    expected = F.normalize(hf.visual_projection(hf.vision_model(pixel_values=images).pooler_output), dim=-1)
    torch.testing.assert_close(theirs.total(), expected, atol=1e-5, rtol=0)
    stacked, labels = theirs.stack("patch" if spatial else "head")
    torch.testing.assert_close(stacked.sum(1), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_recomputed_attention_equals_hf_eager_weights(clip_pair, images):
    _, hf = clip_pair
    eager = CLIPVisionModelWithProjection._from_config(hf.config, attn_implementation="eager").eval()
    eager.load_state_dict(hf.state_dict())
    theirs = eager(pixel_values=images, output_attentions=True).attentions
    trace = segmentation.trace_vision(hf, images)
    assert len(trace.attentions) == len(theirs) == 3
    for mine, reference in zip(trace.attentions, theirs):
        torch.testing.assert_close(mine, reference, atol=1e-6, rtol=0)


@torch.no_grad()
def test_attention_settings_never_change_results(clip_pair, siglip_pair, images):
    for hf in (clip_pair[1], siglip_pair[1]):
        plain = clipdecomp.decompose(hf, images, spatial=True)
        other = type(hf)._from_config(hf.config, attn_implementation="eager").eval()
        other.load_state_dict(hf.state_dict())
        other.config.output_attentions = other.config.output_hidden_states = True
        assert_same_terms(clipdecomp.decompose(other, images, spatial=True), plain)


# ----------------------------------------------------------------------------------- SigLIP (attention pool)


def reference_map_terms(trunk, images: torch.Tensor):
    """Per-piece terms of a timm attention-pool ViT by the plain formula, one token and head at a time.

    Runs the blocks by hand, keeps every piece in residual space per token, freezes the final
    LayerNorm per token and the pool's attention, and maps a piece c with share s to
    sum_h sum_i a^h_i (W_O^h W_V^h (gamma (c_i - s mu_i) / sigma_i + s beta)) + s c_0; heads also per
    source token j, with the output bias split over the K * H (source, head) pairs. Returns
    (embedding, attns, mlps, heads [B, L, H, d'], spatial heads of the last layer [B, K, H, d'], z).
    """
    x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(images)))
    embed, attns, mlps, heads, last_spatial = x, [], [], [], None
    n_heads, head_dim = trunk.blocks[0].attn.num_heads, trunk.embed_dim // trunk.blocks[0].attn.num_heads
    for layer, block in enumerate(trunk.blocks):
        u = block.norm1(x)
        q, k, v = (
            t.unflatten(-1, (n_heads, head_dim)) for t in block.attn.qkv(u).chunk(3, -1)
        )  # [B, K, H, Dh]
        probs = torch.einsum("bihd,bjhd->bhij", q, k).mul(head_dim**-0.5).softmax(-1)
        w_o = block.attn.proj.weight
        per_head = [
            torch.einsum(
                "bij,bjd,ed->bie", probs[:, h], v[:, :, h], w_o[:, h * head_dim : (h + 1) * head_dim]
            )
            + block.attn.proj.bias / n_heads
            for h in range(n_heads)
        ]  # [B, K, W] each
        if layer == len(trunk.blocks) - 1:  # per source token j: [B, K(query), K(source), H, W]
            last_spatial = torch.stack(
                [
                    probs[:, h, :, :, None]
                    * (v[:, :, h] @ w_o[:, h * head_dim : (h + 1) * head_dim].T)[:, None]
                    + block.attn.proj.bias / (n_heads * x.shape[1])
                    for h in range(n_heads)
                ],
                3,
            )
        heads.append(per_head)
        attns.append(block.attn(u))
        x = x + attns[-1]
        mlps.append(block.mlp(block.norm2(x)))
        x = x + mlps[-1]
    norm, pool = trunk.norm, trunk.attn_pool
    mu, sigma = x.mean(-1, keepdim=True), torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    u = norm(x)
    query = pool.q(pool.latent)[0, 0].unflatten(-1, (n_heads, head_dim))
    keys = pool.kv(u).chunk(2, -1)[0].unflatten(-1, (n_heads, head_dim))
    a = torch.einsum("hd,bkhd->bhk", query, keys).mul(head_dim**-0.5).softmax(-1)  # [B, H', K]
    w_v, b_v = pool.kv.weight.chunk(2)[1], pool.kv.bias.chunk(2)[1]
    c_0 = pool.proj(b_v)  # W_O b_V + b_O
    z = trunk(images)
    share = 1 / (2 * len(trunk.blocks) + 1)

    def through_pool(piece: torch.Tensor, s: float) -> torch.Tensor:  # piece [B, K, W] (or [..., K, W])
        ln = norm.weight * (piece - s * mu) / sigma + s * norm.bias
        total = s * c_0
        for h in range(n_heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            value = ln @ w_v[rows].T @ pool.proj.weight[:, rows].T  # [B, K, W]
            total = total + torch.einsum("bk,bkw->bw", a[:, h], value)
        return total / z.norm(dim=-1, keepdim=True)

    spatial = torch.stack(
        [
            torch.stack(
                [
                    through_pool(last_spatial[:, :, j, h], share / (n_heads * x.shape[1]))
                    for h in range(n_heads)
                ],
                1,
            )
            for j in range(x.shape[1])
        ],
        1,
    )
    return (
        through_pool(embed, share),
        torch.stack([through_pool(p, share) for p in attns], 1),
        torch.stack([through_pool(p, share) for p in mlps], 1),
        torch.stack(
            [torch.stack([through_pool(p, share / n_heads) for p in layer], 1) for layer in heads], 1
        ),
        spatial,
        z,
    )


@torch.no_grad()
def test_siglip_terms_match_independent_calculation(siglip_pair, images):
    trunk, _ = siglip_pair
    embed, attns, mlps, heads, last_spatial, z = reference_map_terms(trunk, images)
    parts = clipdecomp.decompose(trunk, images)
    spatial = clipdecomp.decompose(trunk, images, spatial=True, layers=[-1])
    for got, expected in (
        (parts.embedding, embed),
        (parts.attns, attns),
        (parts.mlps, mlps),
        (parts.heads, heads),
        (spatial.heads[:, 0, 1:], last_spatial),
    ):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(parts.total(), F.normalize(z, dim=-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pool_mlp", ["direct", "linearised"])
@pytest.mark.parametrize("spatial", [False, True])
@torch.no_grad()
def test_siglip_terms_sum_to_the_pooled_output(siglip_pair, images, pool_mlp, spatial):
    for model in siglip_pair:
        tower = vision_tower(model)
        expected = F.normalize(tower.features(images), dim=-1)
        parts = clipdecomp.decompose(model, images, spatial=spatial, pool_mlp=pool_mlp)
        assert parts.readout == "map" and (parts.pool_mlp is None) == (pool_mlp == "linearised")
        torch.testing.assert_close(parts.total(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(parts.head_terms().sum(2), parts.attns, atol=1e-6, rtol=0)
        readout_view = parts.pool_heads.sum((1, 2) if spatial else 1)
        readout_view = readout_view + (parts.pool_mlp if parts.pool_mlp is not None else 0)
        torch.testing.assert_close(readout_view, expected, atol=1e-5, rtol=0)
        assert not parts.cls_to_cls.any()
        if spatial:  # token 0 is the zero slot where CLIP towers have their CLS token
            assert parts.heads.shape[2] == parts.pool_heads.shape[1] == 17
            assert not parts.heads[:, :, 0].any() and not parts.pool_heads[:, 0].any()


@torch.no_grad()
def test_hf_and_timm_siglip_give_the_same_terms(siglip_pair, images):
    trunk, hf = siglip_pair
    torch.testing.assert_close(hf(pixel_values=images).pooler_output, trunk(images), atol=1e-5, rtol=0)
    for pool_mlp in ("direct", "linearised"):
        a = clipdecomp.decompose(trunk, images, spatial=True, pool_mlp=pool_mlp)
        b = clipdecomp.decompose(hf, images, spatial=True, pool_mlp=pool_mlp)
        assert_same_terms(a, b)
        torch.testing.assert_close(a.pool_heads, b.pool_heads, atol=1e-6, rtol=0)


@torch.no_grad()
def test_pool_attention_sums_to_one_and_pool_terms_follow_its_tokens(siglip_pair, images):
    trunk, _ = siglip_pair
    trace = segmentation.trace_vision(trunk, images)
    torch.testing.assert_close(trace.pool_attention.sum(-1), torch.ones(3, 4, 1))
    clean = clipdecomp.decompose(trunk, images, spatial=True)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    hook = trunk.norm.register_forward_pre_hook(
        lambda module, args: (args[0][:, order],)
    )  # the pool's input only
    try:
        shuffled = clipdecomp.decompose(trunk, images, spatial=True)
    finally:
        hook.remove()
    torch.testing.assert_close(
        shuffled.pool_heads[:, 1:], clean.pool_heads[:, 1:][:, order], atol=1e-7, rtol=0
    )
    torch.testing.assert_close(shuffled.norm, clean.norm, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(
        shuffled.pool_heads.sum((1, 2)) + shuffled.pool_mlp,
        clean.pool_heads.sum((1, 2)) + clean.pool_mlp,
        atol=1e-6,
        rtol=0,
    )


@torch.no_grad()
def test_conventions_agree_when_the_pool_mlp_is_zero(images):
    trunk = tiny_timm_siglip()
    for parameter in trunk.attn_pool.mlp.fc2.parameters():
        parameter.zero_()
    direct = clipdecomp.decompose(trunk, images, spatial=True, pool_mlp="direct")
    linearised = clipdecomp.decompose(trunk, images, spatial=True, pool_mlp="linearised")
    assert not direct.pool_mlp.any()
    assert_same_terms(direct, linearised, atol=1e-7)


def test_linearised_pool_mlp_needs_a_gelu(images):
    trunk = tiny_timm_siglip()
    trunk.attn_pool.mlp.act = torch.nn.ReLU()
    with pytest.raises(NotImplementedError, match="GELU-family.*pool_mlp='direct'"):
        clipdecomp.decompose(trunk, images, pool_mlp="linearised")
    with pytest.raises(ValueError, match="'direct' or 'linearised'"):
        clipdecomp.decompose(trunk, images, pool_mlp="frozen")


# ------------------------------------------------------------------------------------------ downstream


@torch.no_grad()
def test_ablations_agree_across_backends(clip_pair, siglip_pair, images):
    model, hf = clip_pair
    labels = ["L1H2", "mlp_0", "cls_2", "embed", "attn_1"]
    torch.testing.assert_close(
        intervene(hf, images, labels), intervene(model, images, labels), atol=1e-5, rtol=0
    )
    trunk, hf_siglip = siglip_pair
    labels = ["L1H2", "mlp_0", "embed", "L2H0"]
    torch.testing.assert_close(
        intervene(hf_siglip, images, labels), intervene(trunk, images, labels), atol=1e-5, rtol=0
    )
    same = images[:1].expand(3, -1, -1, -1)
    torch.testing.assert_close(
        intervene(trunk, same, labels), F.normalize(trunk(same), dim=-1), atol=1e-5, rtol=0
    )
    parts = clipdecomp.decompose(trunk, images)
    head = parts.heads[:, 1, 2]
    torch.testing.assert_close(mean_ablate(parts, ["L1H2"]), parts.total() - head + head.mean(0))
    for refuse in (lambda: mean_ablate(parts, ["cls_1"]), lambda: intervene(trunk, images, ["cls_1"])):
        with pytest.raises(ValueError, match="no CLS token"):
            refuse()


def test_segmentation_methods_agree_across_backends(clip_pair, siglip_pair, images):
    classifier = F.normalize(torch.randn(24, 5, generator=torch.Generator().manual_seed(4)), dim=0)
    wide = F.normalize(torch.randn(64, 5, generator=torch.Generator().manual_seed(4)), dim=0)
    pairs = ((clip_pair[0].visual, clip_pair[1]), siglip_pair)  # towers alone: no logit scale on either side
    for (ours, theirs), weights in zip(pairs, (classifier, wide)):
        for name, method in segmentation.METHODS.items():
            maps = method(theirs, images, weights)
            assert maps.shape == (3, 32, 32) and 0 <= maps.min() and maps.max() <= 1, name
            torch.testing.assert_close(maps, method(ours, images, weights), atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: timm.create_model("convnext_atto", pretrained=False), "ConvNeXt"),
        (
            lambda: transformers.Dinov2Model(
                transformers.Dinov2Config(
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=64,
                    image_size=32,
                    patch_size=8,
                )
            ),
            "Dinov2Model",
        ),
        (
            lambda: timm.create_model(
                "vit_small_patch14_dinov2", pretrained=False, img_size=28, num_classes=0
            ),
            "Pooling 'token'",
        ),
        (
            lambda: timm.create_model(
                "vit_base_patch16_siglip_224",
                pretrained=False,
                img_size=32,
                patch_size=8,
                embed_dim=32,
                depth=1,
                num_heads=2,
                global_pool="avg",
                num_classes=0,
            ),
            "Pooling 'avg'",
        ),
        (
            lambda: tiny_hf_siglip(vision_use_head=False),
            "without its attention-pool head",
        ),
    ],
    ids=["convnext", "hf-dinov2", "timm-dinov2", "timm-avg-pool", "siglip-headless"],
)
def test_unsupported_towers_are_refused_naming_what_is_supported(build, name):
    with pytest.raises(
        NotImplementedError, match=f"{name}.*supported: open_clip.*Hugging Face CLIPModel.*Siglip"
    ):
        clipdecomp.decompose(build(), torch.randn(1, 3, 32, 32))


# --------------------------------------------------------------------------------------------- loading


def _sentencepiece(folder) -> str:
    """A tiny SentencePiece vocabulary (SigLIP's tokenizer format), trained here in milliseconds."""
    import sentencepiece

    model = io.BytesIO()
    texts = ["a photo of a cat", "a photo of a dog", "a red square", "a blue circle", "a green shape"] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=24,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    path = folder / "spiece.model"
    path.write_bytes(model.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory, siglip_pair):
    """A full SigLIP checkpoint folder as save_pretrained writes it: model, image processor, tokenizer."""
    folder = tmp_path_factory.mktemp("siglip")
    trunk, hf_vision = siglip_pair
    text = SiglipTextConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=24,
        max_position_embeddings=16,
        projection_size=64,
    )
    model = SiglipModel(
        SiglipConfig(text_config=text.to_dict(), vision_config=hf_vision.config.to_dict())
    ).eval()
    model.vision_model.load_state_dict(hf_vision.state_dict())
    model.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    transformers.SiglipTokenizer(vocab_file=_sentencepiece(folder)).save_pretrained(folder)
    return folder


def test_save_pretrained_folders_load_and_decompose(tmp_path, clip_pair, siglip_folder, siglip_pair, images):
    _, hf = clip_pair
    hf.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    clip = clipdecomp.load(str(tmp_path / "clip"))
    assert (clip.tower.backend, clip.n_layers, clip.n_heads, clip.grid_size, clip.embed_dim) == (
        "hf-clip",
        3,
        4,
        (4, 4),
        24,
    )
    assert clip.weights_sha256 and clip.preprocess_batch(
        images.new_zeros(2, 40, 48, 3, dtype=torch.uint8).numpy()
    ).shape == (2, 3, 32, 32)
    with pytest.raises(NotImplementedError, match="no text tower"):
        clip.encode_text(["a photo of a cat"])
    assert_same_terms(clipdecomp.decompose(clip, images), clipdecomp.decompose(hf, images))

    siglip = clipdecomp.load("hf:" + str(siglip_folder))
    assert siglip.tower.backend == "hf-siglip" and siglip.tower.readout == "map"
    texts = siglip.encode_text(["a photo of a cat", "a red square"])
    assert texts.shape == (2, 64) and torch.allclose(texts.norm(dim=-1), torch.ones(2))
    classifier = clipdecomp.zero_shot_classifier(siglip, ["cat", "dog"], ["a photo of a {}."])
    assert classifier.shape == (64, 2)
    torch.testing.assert_close(
        clipdecomp.decompose(siglip, images).total(), siglip.encode_image(images), atol=1e-5, rtol=0
    )
    assert_same_terms(clipdecomp.decompose(siglip, images), clipdecomp.decompose(siglip_pair[0], images))


def test_missing_hub_model_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_reachable", lambda host, timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(
        clipdecomp.WeightsUnavailableError, match="huggingface-cli download openai/clip-vit-base-patch32"
    ):
        clipdecomp.load("hf:openai/clip-vit-base-patch32", cache_dir=str(tmp_path))
    assert time.perf_counter() - started < 10
    with pytest.raises(NotImplementedError, match="supported transformers models"):
        transformers.BertConfig(num_hidden_layers=1).save_pretrained(tmp_path / "bert")
        (tmp_path / "bert" / "model.safetensors").write_bytes(b"")
        clipdecomp.load(str(tmp_path / "bert"))


@torch.no_grad()
def test_open_clip_siglip_architecture_loads_offline(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(loading, "_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    bundle = clipdecomp.load("ViT-B-16-SigLIP")
    assert (bundle.tower.backend, bundle.n_layers, bundle.n_heads, bundle.grid_size) == (
        "timm-siglip",
        12,
        12,
        (14, 14),
    )
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    parts = clipdecomp.decompose(bundle, image, layers=[-1])
    torch.testing.assert_close(parts.total(), bundle.encode_image(image), atol=1e-5, rtol=0)
    with pytest.raises(
        clipdecomp.WeightsUnavailableError, match="tokenizer of ViT-B-16-SigLIP.*timm/ViT-B-16-SigLIP"
    ):
        bundle.encode_text(["a photo of a cat"])


def test_cache_and_cli_on_hugging_face_folders(tmp_path, siglip_folder, clip_pair):
    from clipdecomp.__main__ import main
    from clipdecomp.cache import DecompositionCache
    from clipdecomp.datasets import ToyDataset

    clip_folder = tmp_path / "clip"
    clip_pair[1].save_pretrained(clip_folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        clip_folder
    )
    for folder, readout in ((siglip_folder, "map"), (clip_folder, "cls")):
        out = tmp_path / f"cache_{readout}"
        options = "decompose --data toy --n-images 4 --dtype float32 --no-progress".split()
        main(options + ["--model", str(folder), "--out", str(out)])
        cache = DecompositionCache.open(out)
        bundle = clipdecomp.load(str(folder))
        data = ToyDataset(4, 0, bundle.preprocess, split="uniform")
        expected = bundle.encode_image(torch.stack([data.image(i) for i in range(4)]))
        torch.testing.assert_close(torch.from_numpy(cache.total()), expected, atol=1e-5, rtol=0)
        parts = cache.to_decomposition()
        assert parts.readout == readout and cache.key["model"]["backend"] == bundle.tower.backend
        torch.testing.assert_close(parts.total(), expected, atol=1e-5, rtol=0)


def test_twins_refuse_what_transformers_cannot_hold():
    with pytest.raises(NotImplementedError, match="no layer scale"):
        hugging_face_twin(tiny_clip(ls_init_value=0.5))
    with pytest.raises(NotImplementedError, match="already are transformers models"):
        hugging_face_twin(tiny_hf_siglip())


@torch.no_grad()
def test_full_clip_model_and_vision_model_without_projection(clip_pair, images):
    _, twin = clip_pair
    text = transformers.CLIPTextConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    full = transformers.CLIPModel(
        transformers.CLIPConfig(
            text_config=text.to_dict(), vision_config=twin.config.to_dict(), projection_dim=24
        )
    ).eval()
    full.vision_model.load_state_dict(twin.vision_model.state_dict())
    full.visual_projection.load_state_dict(twin.visual_projection.state_dict())
    torch.testing.assert_close(
        full.get_image_features(pixel_values=images).pooler_output, twin(images).image_embeds
    )
    assert_same_terms(clipdecomp.decompose(full, images), clipdecomp.decompose(twin, images))
    bare = twin.vision_model  # CLIPVisionModel: no projection, the decomposition is of pooler_output
    parts = clipdecomp.decompose(bare, images, spatial=True)
    expected = F.normalize(bare(pixel_values=images).pooler_output, dim=-1)
    assert parts.total().shape == (3, 64)
    torch.testing.assert_close(parts.total(), expected, atol=1e-5, rtol=0)
