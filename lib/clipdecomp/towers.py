"""The image towers clipdecomp reads: the one module that knows each backend's internals.

Seen from outside, every supported image tower is the same machine:

    x = embed(image)                                  [B, N, W] residual stream (CLS token first, if any)
    for each block:   u = attn_input(x)               the block's first LayerNorm
                      x = x + attn_write(heads(u))    heads, out-projection, layer scale
                      x = x + mlp_write(...)          the block's MLP branch
    then one of two readouts:
      "cls":  y = final_norm(x[:, 0]) @ proj          the CLS token (CLIP)
      "map":  o = attention(probe, final_norm(x))     an attention pool: one learned query over every
              y = o + mlp(norm(o))                    token, then a residual MLP (SigLIP; no CLS token)

A :class:`Tower` names those modules for one backend (so that callers can hook them) and hands out
each attention layer's parameters per head (so that callers can recompute attention exactly). The
decomposition, the ablations and the segmentation baselines read a tower only through it, so an
upgrade of open_clip, transformers or timm touches this file alone. Backends:

* ``"open_clip"``: open_clip's ``VisionTransformer`` (CLS pooling), e.g. ViT-B-16 and the toy model;
* ``"hf-clip"``: Hugging Face ``CLIPModel``, ``CLIPVisionModelWithProjection``, ``CLIPVisionModel``;
* ``"hf-siglip"``: Hugging Face ``SiglipModel`` and ``SiglipVisionModel`` (attention-pool head);
* ``"timm-siglip"``: timm's attention-pool ``VisionTransformer``, alone or as open_clip's ``TimmModel``
  tower (open_clip's ``ViT-B-16-SigLIP`` family).

Models are read, never modified: forward hooks and parameters only.

Example:
    >>> tower = vision_tower(clipdecomp.load("toy"))
    >>> tower.backend, tower.readout, tower.n_tokens == tower.grid_size[0] * tower.grid_size[1] + 1
    ('open_clip', 'cls', True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

__all__ = [
    "AttentionWeights",
    "Block",
    "HFModel",
    "Pool",
    "SUPPORTED",
    "Tower",
    "attention",
    "hugging_face_twin",
    "vision_tower",
]

SUPPORTED = (
    "open_clip CLIP models whose image tower is a VisionTransformer with CLS-token pooling "
    "(pool_type='tok', no attentional pooler) built from standard ResidualAttentionBlocks "
    "with nn.MultiheadAttention, e.g. ViT-B-32, ViT-B-16, ViT-L-14, ViT-H-14 and the toy model; "
    "Hugging Face CLIPModel, CLIPVisionModelWithProjection and CLIPVisionModel; Hugging Face "
    "SiglipModel and SiglipVisionModel with their attention-pool head; timm attention-pool "
    "VisionTransformers without prefix tokens (open_clip's ViT-B-16-SigLIP family), alone or as "
    "open_clip's TimmModel tower"
)


@dataclass(frozen=True)
class AttentionWeights:
    """One attention layer's parameters as plain tensors (views of the parameters, in the model's dtype).

    ``q``, ``k``, ``v`` are the [H*Dh, W] projections with biases [H*Dh]; ``out`` is the [W, H*Dh]
    out-projection with bias [W]; ``layer_scale`` [W] multiplies what the layer writes (ones when the
    block has none); ``scale`` multiplies the scores (Dh^-0.5). Head ``h`` owns rows ``h*Dh:(h+1)*Dh``
    of ``q``, ``k``, ``v`` and the same columns of ``out``.
    """

    q: torch.Tensor
    q_bias: torch.Tensor
    k: torch.Tensor
    k_bias: torch.Tensor
    v: torch.Tensor
    v_bias: torch.Tensor
    out: torch.Tensor
    out_bias: torch.Tensor
    layer_scale: torch.Tensor
    n_heads: int
    scale: float

    @property
    def head_dim(self) -> int:
        return self.q.shape[0] // self.n_heads

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[..., H*Dh] -> [..., H, Dh]."""
        return x.unflatten(-1, (self.n_heads, self.head_dim))

    def write(
        self, mixed: torch.Tensor, heads: Sequence[int] | None = None, bias: bool = True
    ) -> torch.Tensor:
        """What heads write to the residual stream: [B, N, H', Dh] head outputs -> [B, N, W].

        ``heads`` (default all) names the heads in ``mixed``; ``bias`` adds the out-projection's bias.
        """
        out = self.out
        if heads is not None:
            out = self.split(out)[:, list(heads)].flatten(1)
        written = mixed.flatten(-2) @ out.T
        return (written + self.out_bias if bias else written) * self.layer_scale


def attention(
    weights: AttentionWeights,
    u: torch.Tensor,
    heads: Sequence[int] | None = None,
    queries: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over ``u`` [B, N, W] recomputed from the parameters, for ``heads`` (default all).

    ``queries`` [B, Q, W] are the inputs of the query projection (default ``u``: self-attention).
    Returns the heads' outputs before the out-projection [B, Q, H', Dh] (value biases included) and
    the attention probabilities [B, H', Q, N]. Autograd flows through both.
    """
    chosen = list(range(weights.n_heads)) if heads is None else list(heads)

    def project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return weights.split(x @ w.T + b)[:, :, chosen].transpose(1, 2)  # [B, H', tokens, Dh]

    q = project(u if queries is None else queries, weights.q, weights.q_bias)
    k, v = project(u, weights.k, weights.k_bias), project(u, weights.v, weights.v_bias)
    probs = (q @ k.transpose(-1, -2) * weights.scale).softmax(-1)
    return (probs @ v).transpose(1, 2), probs


@dataclass(frozen=True)
class Block:
    """One residual block, by role.

    Attributes:
        module: the block itself (a key for per-block caches).
        attn_input: its output ``u`` [B, N, W] is the attention's input (the first LayerNorm).
        attn_write: its output is what the attention adds to the residual stream [B, N, W].
        mlp_write: its output is what the MLP branch adds to the residual stream [B, N, W].
        mlp_out: the MLP's output projection (nn.Linear): its input is the neurons' activations
            [B, N, M], its output is written (times any layer scale) to the residual stream.
        mixed_input: a module whose input is the heads' outputs before the out-projection
            [B, N, H*Dh], or None where the backend fuses it away (open_clip's nn.MultiheadAttention).
    """

    module: nn.Module
    attn_input: nn.Module
    attn_write: nn.Module
    mlp_write: nn.Module
    mlp_out: nn.Linear
    read_weights: Callable[[], AttentionWeights]
    mixed_input: nn.Module | None = None

    def weights(self) -> AttentionWeights:
        """The attention's parameters, read now (so edits and replaced parameters are seen)."""
        return self.read_weights()


@dataclass(frozen=True)
class Pool:
    """An attention-pool readout: ``o = attention(probe, u)`` over every token, ``y = o + mlp(norm(o))``.

    Attributes:
        module: the whole readout head.
        attn_write: its output is ``o`` [B, 1, W] (a tensor, or a tuple whose first item is it).
        norm, fc1, act, fc2: the residual MLP ``fc2(act(fc1(norm(o))))``.
    """

    module: nn.Module
    attn_write: nn.Module
    norm: nn.LayerNorm
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear
    read_weights: Callable[[], AttentionWeights]
    read_probe: Callable[[], torch.Tensor]

    def weights(self) -> AttentionWeights:
        """The pool attention's parameters (``q`` projects the probe)."""
        return self.read_weights()

    def probe(self) -> torch.Tensor:
        """[W] the learned query's input (before ``weights().q``)."""
        return self.read_probe()

    def attention(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool's attention over ``u`` [B, N, W]: outputs [B, 1, H', Dh], probabilities [B, H', 1, N]."""
        probe = self.probe().to(u.dtype).expand(u.shape[0], 1, -1)
        return attention(self.weights(), u, queries=probe)

    def mlp(self, o: torch.Tensor) -> torch.Tensor:
        """The residual MLP's output for pooled vectors ``o`` [..., W], computed in ``o``'s dtype."""

        def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
            bias = layer.bias.to(x.dtype) if layer.bias is not None else None
            return F.linear(x, layer.weight.to(x.dtype), bias)

        norm = self.norm
        weight = norm.weight.to(o.dtype) if norm.weight is not None else None
        bias = norm.bias.to(o.dtype) if norm.bias is not None else None
        normed = F.layer_norm(o, norm.normalized_shape, weight, bias, norm.eps)
        return linear(self.act(linear(normed, self.fc1)), self.fc2)


@dataclass(frozen=True)
class Tower:
    """A supported image tower, by role (see the module docstring); build it with :func:`vision_tower`.

    Attributes:
        backend: ``"open_clip"``, ``"hf-clip"``, ``"hf-siglip"`` or ``"timm-siglip"``.
        module: the tower itself: its parameters, device, dtype and ``state_dict``.
        blocks: the residual blocks in order.
        embed: its output is the residual stream entering the first block, [B, N, W].
        final_norm: the LayerNorm whose input is the residual stream the readout reads (the CLS
            token [B, W], or every token [B, N, W] when the tower normalises before pooling).
        proj: [W, d'] the projection after ``final_norm`` (CLS readouts), None for attention pools.
        image_size, patch_size: (rows, columns) in pixels.
        pool: the attention-pool readout, or None for a CLS readout.
    """

    backend: str
    module: nn.Module
    blocks: tuple[Block, ...]
    embed: nn.Module
    final_norm: nn.LayerNorm
    proj: torch.Tensor | None
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    n_heads: int
    forward: Callable[[torch.Tensor], torch.Tensor]
    pool: Pool | None = None
    extra_state: Callable[[], dict[str, torch.Tensor]] | None = None

    @property
    def readout(self) -> Literal["cls", "map"]:
        """``"cls"``: the CLS token is read out; ``"map"``: an attention pool reads every token."""
        return "cls" if self.pool is None else "map"

    @property
    def has_cls(self) -> bool:
        return self.pool is None

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.final_norm.normalized_shape[0]

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    @property
    def output_dim(self) -> int:
        return self.proj.shape[1] if self.proj is not None else self.width

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def n_tokens(self) -> int:
        """Tokens in the residual stream: one per patch, plus the CLS token where there is one."""
        return self.grid_size[0] * self.grid_size[1] + int(self.has_cls)

    @property
    def weight(self) -> torch.Tensor:
        """A parameter of the tower: its ``device`` and ``dtype`` are the tower's."""
        return next(self.module.parameters())

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """A preprocessed [B, 3, H, W] batch, moved to the tower's device and dtype; bad input is refused."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                "images must be a torch.Tensor [B, 3, H, W] from the model's preprocess, got "
                f"{type(images).__name__}."
            )
        rows, cols = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (rows, cols):
            raise ValueError(
                f"images must have shape [B, 3, {rows}, {cols}] (preprocessed, RGB), got "
                f"{list(images.shape)}. Apply the bundle's preprocess to each image and "
                "torch.stack them (bundle.preprocess_batch does both)."
            )
        if not images.is_floating_point():
            raise TypeError(
                f"images must be a float tensor (normalised by preprocess), got {images.dtype}; "
                "uint8 pixels must go through the model's preprocess first."
            )
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf values; check the image files and preprocessing.")
        return images.to(device=self.weight.device, dtype=self.weight.dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, d'] the backend's own image embedding (before L2 normalisation) of a checked batch.

        For SigLIP this is the pooled output that its logits use.
        """
        return self.forward(images)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer that the image embedding depends on, by name."""
        state = dict(self.module.state_dict())
        return state | (self.extra_state() if self.extra_state is not None else {})

    def describe(self) -> dict:
        """The tower's shape, as JSON-able facts (recorded in cache keys)."""
        facts = {
            "layers": self.n_layers,
            "width": self.width,
            "image_size": list(self.image_size),
            "patch_size": list(self.patch_size),
        }
        if self.backend == "open_clip":
            return facts
        import timm
        import transformers

        versions = (
            {"timm": timm.__version__}
            if self.backend == "timm-siglip"
            else {"transformers": transformers.__version__}
        )
        return facts | {"backend": self.backend, "readout": self.readout} | versions


class HFModel(nn.Module):
    """A Hugging Face CLIP or SigLIP model with open_clip's face: ``encode_image``, ``encode_text``, logits.

    The wrapped model (``hf``) is unmodified; this is what a bundle loaded from a ``"hf:..."`` spec or
    a ``save_pretrained`` folder holds as ``bundle.model``, so code written for open_clip models
    (zero-shot classifiers, segmentation logits) runs on it unchanged. Image-only checkpoints
    (``CLIPVisionModelWithProjection``, ``SiglipVisionModel``) refuse ``encode_text`` with a clear error.
    """

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        self.tower = vision_tower(hf)

    @property
    def logit_scale(self) -> torch.Tensor | None:
        """The log of the logit temperature (CLIP, SigLIP); None for image-only checkpoints."""
        return getattr(self.hf, "logit_scale", None)

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """SigLIP's logit bias (None for CLIP)."""
        return getattr(self.hf, "logit_bias", None)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.tower.features(images.to(self.tower.weight.dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if not hasattr(self.hf, "get_text_features"):
            raise NotImplementedError(
                f"{type(self.hf).__name__} is an image-only checkpoint: it has no text tower. "
                "Load the full model (CLIPModel or SiglipModel) to embed texts."
            )
        out = self.hf.get_text_features(input_ids=tokens)
        features = (
            out if isinstance(out, torch.Tensor) else out.pooler_output
        )  # transformers 5 returns outputs
        return F.normalize(features, dim=-1) if normalize else features


def vision_tower(model) -> Tower:
    """The :class:`Tower` of a bundle, a CLIP/SigLIP model or an image tower; unsupported ones are refused.

    Accepts a :class:`~clipdecomp.ClipBundle`, an open_clip model or its ``visual`` tower, a Hugging
    Face CLIP/SigLIP model (full or vision-only) or an :class:`HFModel`, and timm attention-pool ViTs.
    Raises NotImplementedError naming what is supported.
    """
    from .loading import ClipBundle

    clip = model.model if isinstance(model, ClipBundle) else model
    if isinstance(clip, HFModel):
        return clip.tower
    visual = getattr(clip, "visual", clip)  # open_clip models hold their image tower as ``visual``
    if isinstance(visual, VisionTransformer):
        return _open_clip_tower(visual)
    name = type(visual).__name__
    if name in ("CLIPModel", "CLIPVisionModelWithProjection", "CLIPVisionModel"):
        return _hf_clip_tower(visual)
    if name in ("SiglipModel", "SiglipVisionModel"):
        return _hf_siglip_tower(visual)
    if name == "TimmModel" or _is_timm_vit(visual):
        return _timm_tower(visual)
    raise NotImplementedError(f"Image tower {name} is not supported; supported: {SUPPORTED}.")


def _is_timm_vit(module: nn.Module) -> bool:
    return type(module).__name__ == "VisionTransformer" and type(module).__module__.startswith("timm.")


def _refuse(what: str) -> NotImplementedError:
    return NotImplementedError(f"{what} is not supported; supported: {SUPPORTED}.")


def _bias(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A layer's bias, or zeros [rows of ``like``] for layers built without one."""
    return bias if bias is not None else like.new_zeros(like.shape[0])


def _layer_scale(module: nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    """The per-channel scale of a LayerScale module (``gamma``), or ones for nn.Identity."""
    gamma = getattr(module, "gamma", None)
    return gamma if gamma is not None else torch.ones(width, dtype=like.dtype, device=like.device)


def _packed_weights(
    in_weight: torch.Tensor,
    in_bias: torch.Tensor | None,
    out: nn.Linear,
    n_heads: int,
    layer_scale: torch.Tensor | None = None,
    scale: float | None = None,
) -> AttentionWeights:
    """AttentionWeights from a packed [3*H*Dh, W] q/k/v projection (nn.MultiheadAttention, timm)."""
    q, k, v = in_weight.chunk(3)
    q_bias, k_bias, v_bias = _bias(in_bias, in_weight).chunk(3)
    head_dim = q.shape[0] // n_heads
    return AttentionWeights(
        q,
        q_bias,
        k,
        k_bias,
        v,
        v_bias,
        out.weight,
        _bias(out.bias, out.weight),
        layer_scale if layer_scale is not None else torch.ones_like(out.weight[:, 0]),
        n_heads,
        scale if scale is not None else head_dim**-0.5,
    )


# ------------------------------------------------------------------------------------------------------
# open_clip VisionTransformer: ln_pre, resblocks (ln_1, attn, ls_1, ln_2, mlp, ls_2), ln_post, proj.
# ------------------------------------------------------------------------------------------------------


def _open_clip_tower(visual: VisionTransformer) -> Tower:
    if visual.attn_pool is not None or visual.pool_type != "tok":
        pooling = "attentional pool" if visual.attn_pool is not None else repr(visual.pool_type)
        raise _refuse(f"Pooling {pooling}")
    for block in visual.transformer.resblocks:
        if type(block) is not ResidualAttentionBlock or not isinstance(block.attn, nn.MultiheadAttention):
            raise _refuse(f"Block type {type(block).__name__}")
    if visual.proj is None:
        raise _refuse("Image towers without a final projection")

    def forward(images: torch.Tensor) -> torch.Tensor:
        out = visual(images)
        return out[0] if isinstance(out, tuple) else out  # output_tokens=True also returns the tokens

    def weights(block: ResidualAttentionBlock) -> AttentionWeights:
        attn = block.attn
        return _packed_weights(
            attn.in_proj_weight,
            attn.in_proj_bias,
            attn.out_proj,
            attn.num_heads,
            _layer_scale(block.ls_1, attn.embed_dim, attn.in_proj_weight),
        )

    blocks = tuple(
        Block(
            module=b,
            attn_input=b.ln_1,
            attn_write=b.ls_1,
            mlp_write=b.ls_2,
            mlp_out=b.mlp.c_proj,
            read_weights=lambda b=b: weights(b),
        )
        for b in visual.transformer.resblocks
    )
    return Tower(
        backend="open_clip",
        module=visual,
        blocks=blocks,
        embed=visual.ln_pre,
        final_norm=visual.ln_post,
        proj=visual.proj,
        image_size=tuple(visual.image_size),
        patch_size=tuple(visual.patch_size),
        n_heads=blocks[0].module.attn.num_heads,
        forward=forward,
    )


# ------------------------------------------------------------------------------------------------------
# Hugging Face transformers: CLIP and SigLIP vision models (transformers 5 layout; 4.x nests the same
# modules one level deeper, as ``vision_model``). Encoder layers: layer_norm1, self_attn (q/k/v/out_proj),
# layer_norm2, mlp (fc1, activation_fn, fc2); no layer scale.
# ------------------------------------------------------------------------------------------------------


def _hf_inner(vision: nn.Module) -> nn.Module:
    """The module holding embeddings/encoder/post_layernorm (transformers 4.x nests it as vision_model)."""
    return vision if hasattr(vision, "encoder") else vision.vision_model


def _hf_blocks(inner: nn.Module) -> tuple[Block, ...]:
    def weights(layer: nn.Module) -> AttentionWeights:
        attn = layer.self_attn
        ones = torch.ones_like(attn.out_proj.weight[:, 0])
        return AttentionWeights(
            attn.q_proj.weight,
            _bias(attn.q_proj.bias, attn.q_proj.weight),
            attn.k_proj.weight,
            _bias(attn.k_proj.bias, attn.k_proj.weight),
            attn.v_proj.weight,
            _bias(attn.v_proj.bias, attn.v_proj.weight),
            attn.out_proj.weight,
            _bias(attn.out_proj.bias, attn.out_proj.weight),
            ones,
            attn.num_heads,
            float(attn.scale),
        )

    return tuple(
        Block(
            module=layer,
            attn_input=layer.layer_norm1,
            attn_write=layer.self_attn.out_proj,
            mlp_write=layer.mlp,
            mlp_out=layer.mlp.fc2,
            mixed_input=layer.self_attn.out_proj,
            read_weights=lambda layer=layer: weights(layer),
        )
        for layer in inner.encoder.layers
    )


def _size(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _hf_clip_tower(model: nn.Module) -> Tower:
    vision = model.vision_model if hasattr(model, "vision_model") and not hasattr(model, "encoder") else model
    inner = _hf_inner(vision)
    projection = getattr(model, "visual_projection", None)
    if projection is not None and projection.bias is not None:
        raise _refuse("A CLIP visual projection with a bias")
    config = inner.config
    proj = (
        projection.weight.T
        if projection is not None
        else torch.eye(
            config.hidden_size,
            dtype=inner.post_layernorm.weight.dtype,
            device=inner.post_layernorm.weight.device,
        )
    )

    def forward(images: torch.Tensor) -> torch.Tensor:
        pooled = vision(pixel_values=images).pooler_output  # post_layernorm(CLS)
        return projection(pooled) if projection is not None else pooled

    def extra_state() -> dict[str, torch.Tensor]:
        return {"visual_projection.weight": projection.weight} if projection is not None else {}

    return Tower(
        backend="hf-clip",
        module=vision,
        blocks=_hf_blocks(inner),
        embed=inner.pre_layrnorm,
        final_norm=inner.post_layernorm,
        proj=proj,
        image_size=_size(config.image_size),
        patch_size=_size(config.patch_size),
        n_heads=config.num_attention_heads,
        forward=forward,
        extra_state=extra_state,
    )


def _hf_siglip_tower(model: nn.Module) -> Tower:
    vision = model.vision_model if type(model).__name__ == "SiglipModel" else model
    inner = _hf_inner(vision)
    if not getattr(inner, "use_head", True) or getattr(inner, "head", None) is None:
        raise _refuse("A SigLIP vision model without its attention-pool head (vision_use_head=False)")
    head, config = inner.head, inner.config
    attn = head.attention
    pool = Pool(
        module=head,
        attn_write=attn,
        norm=head.layernorm,
        fc1=head.mlp.fc1,
        act=head.mlp.activation_fn,
        fc2=head.mlp.fc2,
        read_probe=lambda: head.probe[0, 0],
        read_weights=lambda: _packed_weights(
            attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, attn.num_heads
        ),
    )

    def forward(images: torch.Tensor) -> torch.Tensor:
        return vision(pixel_values=images).pooler_output  # head(post_layernorm(x))

    return Tower(
        backend="hf-siglip",
        module=vision,
        blocks=_hf_blocks(inner),
        embed=inner.embeddings,
        final_norm=inner.post_layernorm,
        proj=None,
        image_size=_size(config.image_size),
        patch_size=_size(config.patch_size),
        n_heads=config.num_attention_heads,
        forward=forward,
        pool=pool,
    )


# ------------------------------------------------------------------------------------------------------
# timm VisionTransformer with an attention pool (global_pool="map"): patch_embed, pos_embed, norm_pre,
# blocks (norm1, attn (qkv, proj), ls1, norm2, mlp (fc1, act, fc2), ls2), norm, attn_pool
# (latent, q, kv, proj, norm, mlp). open_clip's TimmModel puts ``head`` (empty for SigLIP) after it.
# ------------------------------------------------------------------------------------------------------


def _timm_tower(visual: nn.Module) -> Tower:
    from timm.layers import AttentionPoolLatent
    from timm.models.vision_transformer import Attention
    from timm.models.vision_transformer import Block as TimmBlock

    trunk = visual.trunk if type(visual).__name__ == "TimmModel" else visual
    if type(visual).__name__ == "TimmModel" and len(visual.head) > 0:
        raise _refuse(
            "A TimmModel tower with a projection head ("
            + ", ".join(n for n, _ in visual.head.named_children())
            + ")"
        )
    if not _is_timm_vit(trunk):
        raise _refuse(f"timm trunk {type(trunk).__name__}")
    pool_module = getattr(trunk, "attn_pool", None)
    if not isinstance(pool_module, AttentionPoolLatent):
        raise _refuse(
            f"Pooling {trunk.global_pool!r} of a timm VisionTransformer (only attention pools: 'map')"
        )
    if trunk.num_prefix_tokens or getattr(trunk, "dynamic_img_size", False):
        raise _refuse("A timm VisionTransformer with class/register tokens or dynamic image size")
    if (
        pool_module.latent_len != 1
        or pool_module.pos_embed is not None
        or pool_module.mlp is None
        or not all(isinstance(m, nn.Identity) for m in (pool_module.q_norm, pool_module.k_norm))
    ):
        raise _refuse(
            "An attention pool with several latents, its own position embedding, query/key norms or no MLP"
        )
    if not all(isinstance(m, nn.Identity) for m in (trunk.fc_norm, trunk.head)):
        raise _refuse("A timm VisionTransformer with a classifier head (create it with num_classes=0)")
    for block in trunk.blocks:
        attn = getattr(block, "attn", None)
        plain = (
            type(block) is TimmBlock
            and type(attn) is Attention
            and getattr(attn, "gate", None) is None
            and all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm))
        )
        if not plain:
            raise _refuse(f"timm block {type(block).__name__} (q/k norms, gates or a custom attention)")

    def weights(block: nn.Module) -> AttentionWeights:
        attn = block.attn
        return _packed_weights(
            attn.qkv.weight,
            attn.qkv.bias,
            attn.proj,
            attn.num_heads,
            _layer_scale(block.ls1, attn.proj.weight.shape[0], attn.qkv.weight),
            attn.scale,
        )

    def pool_weights() -> AttentionWeights:
        q = pool_module.q
        q_weight = (
            q.weight
            if isinstance(q, nn.Linear)
            else torch.eye(pool_module.latent_dim).to(pool_module.kv.weight)
        )
        q_bias = _bias(q.bias if isinstance(q, nn.Linear) else None, q_weight)
        k, v = pool_module.kv.weight.chunk(2)
        k_bias, v_bias = _bias(pool_module.kv.bias, pool_module.kv.weight).chunk(2)
        out = pool_module.proj
        return AttentionWeights(
            q_weight,
            q_bias,
            k,
            k_bias,
            v,
            v_bias,
            out.weight,
            _bias(out.bias, out.weight),
            torch.ones_like(out.weight[:, 0]),
            pool_module.num_heads,
            pool_module.scale,
        )

    mlp = pool_module.mlp
    pool = Pool(
        module=pool_module,
        attn_write=pool_module.proj,
        norm=pool_module.norm,
        fc1=mlp.fc1,
        act=mlp.act,
        fc2=mlp.fc2,
        read_weights=pool_weights,
        read_probe=lambda: pool_module.latent[0, 0],
    )
    blocks = tuple(
        Block(
            module=b,
            attn_input=b.norm1,
            attn_write=b.ls1,
            mlp_write=b.ls2,
            mlp_out=b.mlp.fc2,
            mixed_input=b.attn.proj,
            read_weights=lambda b=b: weights(b),
        )
        for b in trunk.blocks
    )
    return Tower(
        backend="timm-siglip",
        module=visual,
        blocks=blocks,
        embed=trunk.norm_pre,
        final_norm=trunk.norm,
        proj=None,
        image_size=_size(trunk.patch_embed.img_size),
        patch_size=_size(trunk.patch_embed.patch_size),
        n_heads=trunk.blocks[0].attn.num_heads,
        forward=visual,
        pool=pool,
    )


# ------------------------------------------------------------------------------------------------------
# The same weights in the other library: open_clip CLIP ViT -> transformers CLIP, timm SigLIP -> transformers.
# ------------------------------------------------------------------------------------------------------


def _hf_activation(act: nn.Module) -> str:
    """transformers' ``hidden_act`` name of an activation module."""
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    raise NotImplementedError(f"No transformers activation matches {act}.")


def _copy_linear(target: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    target.weight.copy_(weight)
    if target.bias is not None:
        target.bias.copy_(bias)


@torch.no_grad()
def hugging_face_twin(model) -> nn.Module:
    """The transformers model holding the same weights as an open_clip CLIP ViT or a timm SigLIP tower.

    open_clip's ``VisionTransformer`` becomes a ``CLIPVisionModelWithProjection`` (module by module as in
    the project's BACKENDS.md: ``conv1`` -> ``patch_embedding``, ``ln_pre`` -> ``pre_layrnorm``, ``in_proj``
    -> ``q/k/v_proj``, ``c_fc/c_proj`` -> ``fc1/fc2``, ``proj`` -> ``visual_projection.weight.T``); timm's
    attention-pool ViT (open_clip's ViT-B-16-SigLIP) becomes a ``SiglipVisionModel`` (``AttentionPoolLatent``
    -> the MAP head: ``latent`` -> ``probe``, ``q`` and ``kv`` -> one ``in_proj``). Same pixels in, the same
    embedding out to float rounding: one model read through two libraries. Layer scale has no transformers
    counterpart and is refused.
    """
    import transformers

    tower = vision_tower(model)
    if any(
        not isinstance(getattr(b.module, name, nn.Identity()), nn.Identity)
        for b in tower.blocks
        for name in ("ls_1", "ls_2", "ls1", "ls2")
    ):
        raise NotImplementedError(
            "transformers' CLIP and SigLIP blocks have no layer scale; this tower has one."
        )
    if tower.image_size[0] != tower.image_size[1] or tower.patch_size[0] != tower.patch_size[1]:
        raise NotImplementedError(
            "transformers' CLIP and SigLIP configs describe square images and patches only."
        )
    first = tower.blocks[0]
    sizes = dict(
        hidden_size=tower.width,
        num_hidden_layers=tower.n_layers,
        num_attention_heads=tower.n_heads,
        intermediate_size=first.mlp_out.in_features,
        image_size=tower.image_size[0],
        patch_size=tower.patch_size[0],
        layer_norm_eps=tower.final_norm.eps,
    )
    if tower.backend == "open_clip":
        visual = tower.module
        act = _hf_activation(first.module.mlp.gelu)
        twin = transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(**sizes, projection_dim=tower.output_dim, hidden_act=act)
        )
        inner = twin.vision_model
        inner.embeddings.patch_embedding.weight.copy_(visual.conv1.weight)
        inner.embeddings.class_embedding.copy_(visual.class_embedding)
        inner.embeddings.position_embedding.weight.copy_(visual.positional_embedding)
        inner.pre_layrnorm.load_state_dict(visual.ln_pre.state_dict())
        twin.visual_projection.weight.copy_(visual.proj.T)
        norms = [(b.module.ln_1, b.module.ln_2, b.module.mlp.c_fc) for b in tower.blocks]
    elif tower.backend == "timm-siglip":
        trunk = tower.module.trunk if hasattr(tower.module, "trunk") else tower.module
        if (
            not isinstance(trunk.norm_pre, nn.Identity)
            or trunk.attn_pool.mlp.fc1.out_features != sizes["intermediate_size"]
        ):
            raise NotImplementedError(
                "transformers' SigLIP has no pre-norm and one MLP width for blocks and head."
            )
        twin = transformers.SiglipVisionModel(
            transformers.SiglipVisionConfig(**sizes, hidden_act=_hf_activation(first.module.mlp.act))
        )
        inner = twin
        inner.embeddings.patch_embedding.load_state_dict(trunk.patch_embed.proj.state_dict())
        inner.embeddings.position_embedding.weight.copy_(trunk.pos_embed[0])
        pool, head = tower.pool, twin.head
        weights = pool.weights()
        head.probe.copy_(pool.probe()[None, None])
        head.attention.in_proj_weight.copy_(torch.cat([weights.q, weights.k, weights.v]))
        head.attention.in_proj_bias.copy_(torch.cat([weights.q_bias, weights.k_bias, weights.v_bias]))
        _copy_linear(head.attention.out_proj, weights.out, weights.out_bias)
        for mine, theirs in ((head.layernorm, pool.norm), (head.mlp.fc1, pool.fc1), (head.mlp.fc2, pool.fc2)):
            mine.load_state_dict(theirs.state_dict())
        norms = [(b.module.norm1, b.module.norm2, b.module.mlp.fc1) for b in tower.blocks]
    else:
        raise NotImplementedError(f"{tower.backend} towers already are transformers models.")
    inner.post_layernorm.load_state_dict(tower.final_norm.state_dict())
    for block, (norm_1, norm_2, fc_1), layer in zip(tower.blocks, norms, inner.encoder.layers):
        weights, attn = block.weights(), layer.self_attn
        for target, weight, bias in (
            (attn.q_proj, weights.q, weights.q_bias),
            (attn.k_proj, weights.k, weights.k_bias),
            (attn.v_proj, weights.v, weights.v_bias),
            (attn.out_proj, weights.out, weights.out_bias),
        ):
            _copy_linear(target, weight, bias)
        for mine, theirs in (
            (layer.layer_norm1, norm_1),
            (layer.layer_norm2, norm_2),
            (layer.mlp.fc1, fc_1),
            (layer.mlp.fc2, block.mlp_out),
        ):
            mine.load_state_dict(theirs.state_dict())
    return twin.to(device=tower.weight.device, dtype=tower.weight.dtype).eval()
