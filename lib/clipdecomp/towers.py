"""The image towers clipdecomp reads: the one module that knows each backend's internals.

Seen from outside, every supported image tower is the same machine:

    x = embed(image)                                  [B, N, W] residual stream (CLS token first)
    for each block:   u = attn_input(x)               the block's first LayerNorm
                      x = x + attn_write(heads(u))    heads, out-projection, layer scale
                      x = x + mlp_write(...)          the block's MLP branch
    y = final_norm(x[:, 0]) @ proj                    the CLS readout

A :class:`Tower` names those modules for one backend (so that callers can hook them) and hands out
each attention layer's parameters per head (so that callers can recompute attention exactly). The
decomposition, the ablations and the segmentation baselines read a tower only through it, so an
upgrade of open_clip touches this file alone.

Example:
    >>> tower = vision_tower(clipdecomp.load("toy"))
    >>> tower.backend, tower.n_tokens == tower.grid_size[0] * tower.grid_size[1] + 1
    ('open_clip', True)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

__all__ = ["AttentionWeights", "Block", "SUPPORTED", "Tower", "attention", "vision_tower"]

SUPPORTED = ("open_clip CLIP models whose image tower is a VisionTransformer with CLS-token pooling "
             "(pool_type='tok', no attentional pooler) built from standard ResidualAttentionBlocks "
             "with nn.MultiheadAttention, e.g. ViT-B-32, ViT-B-16, ViT-L-14, ViT-H-14 and the toy model")


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

    def write(self, mixed: torch.Tensor, heads: Sequence[int] | None = None,
              bias: bool = True) -> torch.Tensor:
        """What heads write to the residual stream: [B, N, H', Dh] head outputs -> [B, N, W].

        ``heads`` (default all) names the heads in ``mixed``; ``bias`` adds the out-projection's bias.
        """
        out = self.out
        if heads is not None:
            out = self.split(out)[:, list(heads)].flatten(1)
        written = mixed.flatten(-2) @ out.T
        return (written + self.out_bias if bias else written) * self.layer_scale


def attention(weights: AttentionWeights, u: torch.Tensor,
              heads: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of ``u`` [B, N, W] recomputed from the parameters, for ``heads`` (default all).

    Returns the heads' outputs before the out-projection [B, N, H', Dh] (value biases included) and
    the attention probabilities [B, H', N queries, N keys]. Autograd flows through both.
    """
    chosen = list(range(weights.n_heads)) if heads is None else list(heads)
    projections = ((weights.q, weights.q_bias), (weights.k, weights.k_bias), (weights.v, weights.v_bias))
    q, k, v = (weights.split(u @ w.T + b)[:, :, chosen].transpose(1, 2)  # each [B, H', N, Dh]
               for w, b in projections)
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
    """

    module: nn.Module
    attn_input: nn.Module
    attn_write: nn.Module
    mlp_write: nn.Module
    mlp_out: nn.Linear
    read_weights: Callable[[], AttentionWeights]

    def weights(self) -> AttentionWeights:
        """The attention's parameters, read now (so edits and replaced parameters are seen)."""
        return self.read_weights()


@dataclass(frozen=True)
class Tower:
    """A supported image tower, by role (see the module docstring); build it with :func:`vision_tower`.

    Attributes:
        backend: which library built the tower (``"open_clip"``).
        module: the tower itself: its parameters, device, dtype and ``state_dict``.
        blocks: the residual blocks in order.
        embed: its output is the residual stream entering the first block, [B, N, W].
        final_norm: the LayerNorm whose input is the residual stream the readout reads (the CLS
            token [B, W], or every token [B, N, W] when the tower normalises before pooling).
        proj: [W, d'] the projection after ``final_norm``.
        image_size, patch_size: (rows, columns) in pixels.
    """

    backend: str
    module: nn.Module
    blocks: tuple[Block, ...]
    embed: nn.Module
    final_norm: nn.LayerNorm
    proj: torch.Tensor
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    n_heads: int
    forward: Callable[[torch.Tensor], torch.Tensor]

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
        return self.proj.shape[1]

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def n_tokens(self) -> int:
        """Tokens in the residual stream: the CLS token and one per patch."""
        return self.grid_size[0] * self.grid_size[1] + 1

    @property
    def weight(self) -> torch.Tensor:
        """A parameter of the tower: its ``device`` and ``dtype`` are the tower's."""
        return next(self.module.parameters())

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """A preprocessed [B, 3, H, W] batch, moved to the tower's device and dtype; bad input is refused."""
        if not isinstance(images, torch.Tensor):
            raise TypeError("images must be a torch.Tensor [B, 3, H, W] from the model's preprocess, got "
                            f"{type(images).__name__}.")
        rows, cols = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (rows, cols):
            raise ValueError(f"images must have shape [B, 3, {rows}, {cols}] (preprocessed, RGB), got "
                             f"{list(images.shape)}. Apply the bundle's preprocess to each image and "
                             "torch.stack them (bundle.preprocess_batch does both).")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor (normalised by preprocess), got {images.dtype}; "
                            "uint8 pixels must go through the model's preprocess first.")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf values; check the image files and preprocessing.")
        return images.to(device=self.weight.device, dtype=self.weight.dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, d'] the backend's own image embedding (before L2 normalisation) of a checked batch."""
        return self.forward(images)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer that the image embedding depends on, by name."""
        return self.module.state_dict()

    def describe(self) -> dict:
        """The tower's shape, as JSON-able facts (recorded in cache keys)."""
        return {"layers": self.n_layers, "width": self.width, "image_size": list(self.image_size),
                "patch_size": list(self.patch_size)}


def vision_tower(model) -> Tower:
    """The :class:`Tower` of a bundle, a CLIP model or an image tower; unsupported towers are refused.

    Raises NotImplementedError naming what is supported.
    """
    from .loading import ClipBundle

    clip = model.model if isinstance(model, ClipBundle) else model
    visual = clip if isinstance(clip, VisionTransformer) else getattr(clip, "visual", None)
    if isinstance(visual, VisionTransformer):
        return _open_clip_tower(visual)
    name = type(visual).__name__ if visual is not None else type(clip).__name__
    raise NotImplementedError(f"Image tower {name} is not supported; supported: {SUPPORTED}.")


def _layer_scale(module: nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    """The per-channel scale of a LayerScale module (``gamma``), or ones for nn.Identity."""
    gamma = getattr(module, "gamma", None)
    return gamma if gamma is not None else torch.ones(width, dtype=like.dtype, device=like.device)


def _bias(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A layer's bias, or zeros [rows of ``like``] for layers built without one."""
    return bias if bias is not None else like.new_zeros(like.shape[0])


def _open_clip_weights(block: ResidualAttentionBlock) -> AttentionWeights:
    attn = block.attn
    q, k, v = attn.in_proj_weight.chunk(3)
    q_bias, k_bias, v_bias = _bias(attn.in_proj_bias, attn.in_proj_weight).chunk(3)
    head_dim = attn.embed_dim // attn.num_heads
    return AttentionWeights(q, q_bias, k, k_bias, v, v_bias, attn.out_proj.weight,
                            _bias(attn.out_proj.bias, attn.out_proj.weight),
                            _layer_scale(block.ls_1, attn.embed_dim, q), attn.num_heads, head_dim ** -0.5)


def _open_clip_tower(visual: VisionTransformer) -> Tower:
    if visual.attn_pool is not None or visual.pool_type != "tok":
        pooling = "attentional pool" if visual.attn_pool is not None else repr(visual.pool_type)
        raise NotImplementedError(f"Pooling {pooling} is not supported; supported: {SUPPORTED}.")
    for block in visual.transformer.resblocks:
        if type(block) is not ResidualAttentionBlock or not isinstance(block.attn, nn.MultiheadAttention):
            raise NotImplementedError(f"Block type {type(block).__name__} is not supported; "
                                      f"supported: {SUPPORTED}.")
    if visual.proj is None:
        raise NotImplementedError(f"Image towers without a final projection are not supported; "
                                  f"supported: {SUPPORTED}.")

    def forward(images: torch.Tensor) -> torch.Tensor:
        out = visual(images)
        return out[0] if isinstance(out, tuple) else out  # output_tokens=True also returns the tokens

    blocks = tuple(Block(module=b, attn_input=b.ln_1, attn_write=b.ls_1, mlp_write=b.ls_2,
                         mlp_out=b.mlp.c_proj, read_weights=lambda b=b: _open_clip_weights(b))
                   for b in visual.transformer.resblocks)
    return Tower(backend="open_clip", module=visual, blocks=blocks, embed=visual.ln_pre,
                 final_norm=visual.ln_post, proj=visual.proj, image_size=tuple(visual.image_size),
                 patch_size=tuple(visual.patch_size), n_heads=blocks[0].module.attn.num_heads,
                 forward=forward)
