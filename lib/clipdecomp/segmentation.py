"""Zero-shot segmentation heatmaps: the paper's decomposition and four attention-based baselines.

Every method is a function ``(model, images, classifier) -> maps``: ``images`` is a preprocessed
[B, 3, H, W] batch, ``classifier`` the [d', C] zero-shot class embeddings (columns), and ``maps`` is
[B, H, W] in [0, 1]. Methods that explain a class explain the image's *predicted* class (the argmax
of its zero-shot logits). All share one ending: per-patch scores are reshaped to the patch grid,
upsampled bilinearly to the image size, clipped below 0 and min-max normalised per image
(a constant map becomes all zeros).

* ``decomposition`` (the paper, Sec. 5): each patch's direct contribution summed over all layers and
  heads (spatial decomposition, CLS key dropped), dotted with the predicted class's embedding minus the
  mean class embedding.
* ``raw_attention``: the last layer's attention from the CLS query to each patch, heads averaged.
* ``rollout`` (Abnar & Zuidema 2020): per layer, heads-averaged attention plus the identity (for the
  residual), rows renormalised; the product over layers; the CLS row.
* ``gradcam`` (Selvaraju et al. 2017, on tokens): the activations are the last block's attention
  inputs (``ln_1`` output, one W-vector per token); the channel weights are the gradients of the
  predicted logit averaged over patch tokens; the map is ReLU of the weighted channel sum per patch.
  (The last block's *outputs* cannot be used: only their CLS token reaches the embedding, so the
  patch tokens get zero gradient.)
* ``chefer`` (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability", the gradient-only
  follow-up of "Transformer Interpretability Beyond Attention Visualization"): relevance ``R = I``;
  per layer ``R <- R + mean_h[(dlogit/dA ⊙ A)^+] R``; the CLS row of ``R``. Deviation: the LRP
  relevance of the first paper is replaced by the attention itself, as in the follow-up.

The baselines need every layer's attention probabilities and their gradients, which open_clip's
``nn.MultiheadAttention`` does not return. :func:`trace_vision` therefore re-runs the image tower from
its own modules and parameters (conv1, embeddings, ``ln_pre``, each block's ``ln_1``, ``in_proj``,
``out_proj``, ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``, then ``ln_post`` and ``proj``), computing attention
explicitly; its output equals ``model.encode_image`` (a test checks it to 1e-5). The model is not
modified.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from .decomposition import decompose, vision_tower
from .loading import ClipBundle
from .seg_metrics import normalise

__all__ = ["METHODS", "PASS_BYTES", "Trace", "chefer", "decomposition", "gradcam", "predict", "raw_attention",
           "rollout", "segment", "to_pixels", "trace_vision"]

PASS_BYTES = 1 << 30
"""Memory budget of one spatial-decomposition pass in :func:`decomposition` (fp32 bytes of its terms)."""

Method = Callable[[nn.Module | ClipBundle, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Trace:
    """One forward pass of the image tower with its internals kept (autograd-connected when enabled).

    Attributes:
        features: [B, d'] image features before L2 normalisation (= ``model.encode_image``).
        attentions: per layer, [B, heads, N, N] attention probabilities (query rows, key columns).
        last_input: [B, N, W] the last block's attention input (its ``ln_1`` output).
    """

    features: torch.Tensor
    attentions: list[torch.Tensor]
    last_input: torch.Tensor


def _clip_model(model: nn.Module | ClipBundle) -> nn.Module:
    return model.model if isinstance(model, ClipBundle) else model


def _check_batch(images: torch.Tensor, visual: VisionTransformer) -> torch.Tensor:
    size = tuple(visual.image_size)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, *size):
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a preprocessed tensor [B, 3, {size[0]}, {size[1]}], got {shape}; "
                         "apply the bundle's preprocess to each image and torch.stack them.")
    if not images.is_floating_point():
        raise TypeError(f"images must be float (normalised by the preprocess), got {images.dtype}.")
    return images.to(device=visual.conv1.weight.device, dtype=visual.conv1.weight.dtype)


def _check_classifier(classifier: torch.Tensor, width: int) -> None:
    if not isinstance(classifier, torch.Tensor) or classifier.ndim != 2 or classifier.shape[0] != width:
        shape = list(classifier.shape) if isinstance(classifier, torch.Tensor) else type(classifier).__name__
        raise ValueError(f"classifier must be [d'={width}, classes] (e.g. clipdecomp.zero_shot_classifier), "
                         f"got {shape}.")


def _attention(attn: nn.MultiheadAttention, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of ``u`` [B, N, W] from the module's parameters: (output [B, N, W], probs [B, H, N, N])."""
    batch, n_tokens, width = u.shape
    heads = attn.num_heads
    q, k, v = F.linear(u, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, n_tokens, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    probs = (q @ k.transpose(-1, -2) * (width // heads) ** -0.5).softmax(-1)
    mixed = (probs @ v).transpose(1, 2).reshape(batch, n_tokens, width)
    return attn.out_proj(mixed), probs


def trace_vision(model: nn.Module | ClipBundle, images: torch.Tensor) -> Trace:
    """Run the image tower from its modules, keeping every layer's attention probabilities.

    Gradients flow if the caller has them enabled (the baselines take gradients w.r.t. ``attentions``).
    """
    visual = vision_tower(_clip_model(model))
    x = _check_batch(images, visual)
    x = visual.conv1(x).flatten(2).transpose(1, 2)                             # [B, grid cells, W]
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = visual.patch_dropout(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
    x = visual.ln_pre(x)
    attentions = []
    for block in visual.transformer.resblocks:
        u = block.ln_1(x)
        out, probs = _attention(block.attn, u)
        attentions.append(probs)
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    features = visual.ln_post(x[:, 0]) @ visual.proj                            # LayerNorm is per token
    return Trace(features=features, attentions=attentions, last_input=u)


def _logits(features: torch.Tensor, classifier: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Zero-shot logits: scaled cosine similarity of the image features with each class embedding."""
    scale = model.logit_scale.exp() if hasattr(model, "logit_scale") else 1.0
    return scale * F.normalize(features, dim=-1) @ classifier.to(features)


def predict(model: nn.Module | ClipBundle, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """[B] the zero-shot predicted class of each image (argmax over the classifier's columns)."""
    clip = _clip_model(model)
    _check_classifier(classifier, vision_tower(clip).proj.shape[1])
    with torch.no_grad():
        return _logits(trace_vision(clip, images).features, classifier, clip).argmax(-1)


def to_pixels(scores: torch.Tensor, grid_size: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """[B, patches] scores -> [B, H, W] map: grid, bilinear upsampling, clip < 0, min-max per image."""
    grid = scores.float().reshape(scores.shape[0], 1, *grid_size)
    return normalise(F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)[:, 0].clamp_min(0))


def decomposition(model: nn.Module | ClipBundle, images: torch.Tensor, classifier: torch.Tensor,
                  layers_per_pass: int | None = None) -> torch.Tensor:
    """The paper's map: patch direct effects on the predicted class minus the mean class ([B, H, W]).

    ``layers_per_pass`` bounds memory on large models: the spatial decomposition ([B, layers, N, H, d'])
    is computed for that many layers at a time (one forward pass each). ``None`` picks as many layers
    as keep that tensor under :data:`PASS_BYTES` (all of them for small models).
    """
    clip = _clip_model(model)
    visual = vision_tower(clip)
    _check_classifier(classifier, visual.proj.shape[1])
    blocks = visual.transformer.resblocks
    n_layers, n_tokens = len(blocks), visual.grid_size[0] * visual.grid_size[1] + 1
    per_layer = images.shape[0] * n_tokens * blocks[0].attn.num_heads * visual.proj.shape[1] * 4
    step = layers_per_pass or max(1, min(n_layers, PASS_BYTES // per_layer))
    contrast = classifier.float() - classifier.float().mean(1, keepdim=True)     # class minus the mean class
    scores, directions = 0.0, None
    for start in range(0, n_layers, step):
        parts = decompose(clip, images, spatial=True, layers=range(start, min(start + step, n_layers)))
        if directions is None:
            directions = contrast.to(parts.heads.device)[:, (parts.total() @ classifier.to(parts.heads)).argmax(-1)].T
        patches = parts.heads[:, :, 1:].sum((1, 3))                              # [B, N-1, d'], CLS key dropped
        scores = scores + torch.einsum("bnd,bd->bn", patches, directions)
    return to_pixels(scores, visual.grid_size, images.shape[-2:])


@torch.no_grad()
def raw_attention(model: nn.Module | ClipBundle, images: torch.Tensor,
                  classifier: torch.Tensor | None = None) -> torch.Tensor:
    """Last layer's CLS-to-patch attention, heads averaged ([B, H, W]); ``classifier`` is not used."""
    visual = vision_tower(_clip_model(model))
    last = trace_vision(model, images).attentions[-1].float()
    return to_pixels(last.mean(1)[:, 0, 1:], visual.grid_size, images.shape[-2:])


@torch.no_grad()
def rollout(model: nn.Module | ClipBundle, images: torch.Tensor,
            classifier: torch.Tensor | None = None) -> torch.Tensor:
    """Attention rollout over all layers, CLS row ([B, H, W]); ``classifier`` is not used."""
    visual = vision_tower(_clip_model(model))
    attentions = trace_vision(model, images).attentions
    eye = torch.eye(attentions[0].shape[-1], device=attentions[0].device)
    joint = eye
    for probs in attentions:
        mixed = probs.float().mean(1) + eye                                      # the residual keeps the token
        joint = (mixed / mixed.sum(-1, keepdim=True)) @ joint
    return to_pixels(joint[:, 0, 1:], visual.grid_size, images.shape[-2:])


def _predicted_logit(clip: nn.Module, trace: Trace, classifier: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each image's predicted-class logit (images are independent in the graph)."""
    logits = _logits(trace.features.float(), classifier, clip)
    return logits.gather(1, logits.argmax(-1, keepdim=True)).sum()


def gradcam(model: nn.Module | ClipBundle, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Grad-CAM on the last block's input tokens for the predicted class's logit ([B, H, W])."""
    clip = _clip_model(model)
    visual = vision_tower(clip)
    _check_classifier(classifier, visual.proj.shape[1])
    with torch.enable_grad():
        trace = trace_vision(clip, images.detach().requires_grad_())  # a graph even if weights are frozen
        grad, = torch.autograd.grad(_predicted_logit(clip, trace, classifier), trace.last_input)
    tokens, grad = trace.last_input.detach().float()[:, 1:], grad.float()[:, 1:]
    weights = grad.mean(1, keepdim=True)                                        # [B, 1, W] per-channel weight
    cam = (tokens * weights).sum(-1).clamp_min(0)
    return to_pixels(cam, visual.grid_size, images.shape[-2:])


def chefer(model: nn.Module | ClipBundle, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Gradient-weighted attention relevance of Chefer et al. (2021), CLS row ([B, H, W])."""
    clip = _clip_model(model)
    visual = vision_tower(clip)
    _check_classifier(classifier, visual.proj.shape[1])
    with torch.enable_grad():
        trace = trace_vision(clip, images.detach().requires_grad_())
        grads = torch.autograd.grad(_predicted_logit(clip, trace, classifier), trace.attentions)
    relevance = torch.eye(trace.attentions[0].shape[-1], device=grads[0].device).expand(images.shape[0], -1, -1)
    for probs, grad in zip(trace.attentions, grads):
        weighted = (grad.float() * probs.detach().float()).clamp_min(0).mean(1)   # [B, N, N]
        relevance = relevance + weighted @ relevance
    return to_pixels(relevance[:, 0, 1:], visual.grid_size, images.shape[-2:])


METHODS: dict[str, Method] = {
    "decomposition": decomposition,
    "raw attention": raw_attention,
    "rollout": rollout,
    "Grad-CAM": gradcam,
    "Chefer et al.": chefer,
}
"""Display name -> method, in the order of the comparison tables."""


def segment(method: Method | str, model: nn.Module | ClipBundle, images: torch.Tensor, classifier: torch.Tensor,
            batch_size: int = 32) -> torch.Tensor:
    """Apply one method (a function or a :data:`METHODS` name) to a large batch; maps [n, H, W] on the CPU."""
    if isinstance(method, str):
        if method not in METHODS:
            raise KeyError(f"Unknown method {method!r}; choose one of {list(METHODS)}.")
        method = METHODS[method]
    device = _clip_model(model).visual.conv1.weight.device
    return torch.cat([method(model, chunk.to(device), classifier.to(device)).cpu()
                      for chunk in images.split(batch_size)])
