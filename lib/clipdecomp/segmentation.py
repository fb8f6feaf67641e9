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

Attention-pool towers (SigLIP) have no CLS token: their pool's learned query stands in for it. Raw
attention is the pool's attention over the patches, rollout and Chefer's relevance end with the pool's
(gradient-weighted) attention row times ``R`` instead of the CLS row, and Grad-CAM keeps every token.

The baselines need every layer's attention probabilities and their gradients, which open_clip's
``nn.MultiheadAttention`` does not return. :func:`trace_vision` therefore runs the unmodified tower with
forward hooks (the modules :mod:`clipdecomp.towers` names) that replace what each attention layer writes
by the same value recomputed explicitly from the layer's input and parameters, so the probabilities are
part of the autograd graph; its output equals ``model.encode_image`` (a test checks it to 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decomposition import _check_layers, decompose
from .loading import ClipBundle
from .seg_metrics import normalise
from .towers import attention, vision_tower

__all__ = [
    "METHODS",
    "PASS_BYTES",
    "Trace",
    "chefer",
    "decomposition",
    "gradcam",
    "predict",
    "raw_attention",
    "rollout",
    "segment",
    "to_pixels",
    "trace_vision",
]

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
        pool_attention: attention-pool towers: [B, heads, 1, N] the pool query's attention over the
            tokens; None for CLS readouts.
    """

    features: torch.Tensor
    attentions: list[torch.Tensor]
    last_input: torch.Tensor
    pool_attention: torch.Tensor | None = None

    def readout_row(self, relevance: torch.Tensor, pool_row: torch.Tensor | None = None) -> torch.Tensor:
        """[B, patches] what the readout takes from each patch, given token-to-token ``relevance`` [B, N, N].

        CLS readouts: the CLS row, CLS column dropped. Attention pools: ``pool_row`` [B, N] (default the
        pool's attention, heads averaged) times ``relevance``.
        """
        if self.pool_attention is None:
            return relevance[:, 0, 1:]
        row = self.pool_attention.float().mean(1)[:, 0] if pool_row is None else pool_row
        return (row[:, None] @ relevance)[:, 0]


def _clip_model(model: nn.Module | ClipBundle) -> nn.Module:
    return model.model if isinstance(model, ClipBundle) else model


def _check_classifier(classifier: torch.Tensor, width: int) -> None:
    if not isinstance(classifier, torch.Tensor) or classifier.ndim != 2 or classifier.shape[0] != width:
        shape = list(classifier.shape) if isinstance(classifier, torch.Tensor) else type(classifier).__name__
        raise ValueError(
            f"classifier must be [d'={width}, classes] (e.g. clipdecomp.zero_shot_classifier), got {shape}."
        )


def trace_vision(model: nn.Module | ClipBundle, images: torch.Tensor) -> Trace:
    """Run the image tower with every layer's attention recomputed explicitly, keeping the probabilities.

    Gradients flow if the caller has them enabled (the baselines take gradients w.r.t. ``attentions``).
    """
    tower = vision_tower(model)
    images = tower.check_images(images)
    inputs: dict[int | str, torch.Tensor] = {}
    attentions: list[torch.Tensor] = []

    def keep_input(index: int | str):
        return lambda module, args, out: inputs.__setitem__(index, out)

    def recompute(index: int):
        def hook(module, args, out):
            weights = tower.blocks[index].weights()
            mixed, probs = attention(weights, inputs[index])
            attentions.append(probs)
            return weights.write(mixed)

        return hook

    def recompute_pool(module, args, out):
        mixed, probs = tower.pool.attention(inputs["pool"])
        pooled.append(probs)
        written = tower.pool.weights().write(mixed)
        return (written, *out[1:]) if isinstance(out, tuple) else written

    pooled: list[torch.Tensor] = []
    hooks = [
        h
        for i, block in enumerate(tower.blocks)
        for h in (
            block.attn_input.register_forward_hook(keep_input(i)),
            block.attn_write.register_forward_hook(recompute(i)),
        )
    ]
    if tower.pool is not None:
        hooks += [
            tower.final_norm.register_forward_hook(keep_input("pool")),
            tower.pool.attn_write.register_forward_hook(recompute_pool),
        ]
    try:
        features = tower.features(images)
    finally:
        for hook in hooks:
            hook.remove()
    return Trace(
        features=features,
        attentions=attentions,
        last_input=inputs[tower.n_layers - 1],
        pool_attention=pooled[0] if pooled else None,
    )


def _logits(features: torch.Tensor, classifier: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Zero-shot logits: scaled cosine similarity of the image features with each class embedding."""
    scale = getattr(model, "logit_scale", None)
    scale = scale.exp() if scale is not None else 1.0
    return scale * F.normalize(features, dim=-1) @ classifier.to(features)


def predict(model: nn.Module | ClipBundle, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """[B] the zero-shot predicted class of each image (argmax over the classifier's columns)."""
    clip = _clip_model(model)
    _check_classifier(classifier, vision_tower(clip).output_dim)
    with torch.no_grad():
        return _logits(trace_vision(clip, images).features, classifier, clip).argmax(-1)


def to_pixels(scores: torch.Tensor, grid_size: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """[B, patches] scores -> [B, H, W] map: grid, bilinear upsampling, clip < 0, min-max per image."""
    grid = scores.float().reshape(scores.shape[0], 1, *grid_size)
    return normalise(
        F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)[:, 0].clamp_min(0)
    )


def decomposition(
    model: nn.Module | ClipBundle,
    images: torch.Tensor,
    classifier: torch.Tensor,
    layers_per_pass: int | None = None,
    *,
    centred: bool = True,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """The paper's map: patch direct effects on the predicted class minus the mean class ([B, H, W]).

    ``layers_per_pass`` bounds memory on large models: the spatial decomposition ([B, layers, N, H, d'])
    is computed for that many layers at a time (one forward pass each). ``None`` picks as many layers
    as keep that tensor under :data:`PASS_BYTES` (all of them for small models). Two variants of the
    paper's choices: ``centred=False`` scores along the raw class embedding (the mean class kept), and
    ``layers`` (e.g. ``[-2, -1]``) keeps only those layers' heads.
    """
    clip = _clip_model(model)
    tower = vision_tower(clip)
    _check_classifier(classifier, tower.output_dim)
    chosen = _check_layers(layers, tower.n_layers)
    per_layer = images.shape[0] * tower.n_tokens * tower.n_heads * tower.output_dim * 4
    step = layers_per_pass or max(1, min(len(chosen), PASS_BYTES // per_layer))
    contrast = (
        classifier.float() - classifier.float().mean(1, keepdim=True) if centred else classifier.float()
    )
    scores, directions = 0.0, None
    for start in range(0, len(chosen), step):
        parts = decompose(clip, images, spatial=True, layers=chosen[start : start + step])
        if directions is None:
            directions = contrast.to(parts.heads.device)[
                :, (parts.total() @ classifier.to(parts.heads)).argmax(-1)
            ].T
        patches = parts.heads[:, :, 1:].sum((1, 3))  # [B, N-1, d'], CLS key dropped
        scores = scores + torch.einsum("bnd,bd->bn", patches, directions)
    return to_pixels(scores, tower.grid_size, images.shape[-2:])


@torch.no_grad()
def raw_attention(
    model: nn.Module | ClipBundle, images: torch.Tensor, classifier: torch.Tensor | None = None
) -> torch.Tensor:
    """Last layer's CLS-to-patch attention, heads averaged ([B, H, W]); ``classifier`` is not used."""
    trace = trace_vision(model, images)
    identity = torch.eye(trace.last_input.shape[1], device=trace.last_input.device)
    scores = (
        trace.readout_row(identity)
        if trace.pool_attention is not None
        else trace.readout_row(trace.attentions[-1].float().mean(1))
    )
    return to_pixels(scores, vision_tower(model).grid_size, images.shape[-2:])


@torch.no_grad()
def rollout(
    model: nn.Module | ClipBundle, images: torch.Tensor, classifier: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention rollout over all layers, CLS row ([B, H, W]); ``classifier`` is not used."""
    trace = trace_vision(model, images)
    attentions = trace.attentions
    eye = torch.eye(attentions[0].shape[-1], device=attentions[0].device)
    joint = eye
    for probs in attentions:
        mixed = probs.float().mean(1) + eye  # the residual keeps the token
        joint = (mixed / mixed.sum(-1, keepdim=True)) @ joint
    return to_pixels(trace.readout_row(joint), vision_tower(model).grid_size, images.shape[-2:])


def _predicted_logit(clip: nn.Module, trace: Trace, classifier: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each image's predicted-class logit (images are independent in the graph)."""
    logits = _logits(trace.features.float(), classifier, clip)
    return logits.gather(1, logits.argmax(-1, keepdim=True)).sum()


def gradcam(model: nn.Module | ClipBundle, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Grad-CAM on the last block's input tokens for the predicted class's logit ([B, H, W])."""
    clip = _clip_model(model)
    tower = vision_tower(clip)
    _check_classifier(classifier, tower.output_dim)
    with torch.enable_grad():
        trace = trace_vision(clip, images.detach().requires_grad_())  # a graph even if weights are frozen
        (grad,) = torch.autograd.grad(_predicted_logit(clip, trace, classifier), trace.last_input)
    patches = slice(1, None) if tower.has_cls else slice(None)  # the CLS token has no place
    tokens, grad = trace.last_input.detach().float()[:, patches], grad.float()[:, patches]
    weights = grad.mean(1, keepdim=True)  # [B, 1, W] per-channel weight
    cam = (tokens * weights).sum(-1).clamp_min(0)
    return to_pixels(cam, tower.grid_size, images.shape[-2:])


def chefer(model: nn.Module | ClipBundle, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Gradient-weighted attention relevance of Chefer et al. (2021), CLS row ([B, H, W])."""
    clip = _clip_model(model)
    tower = vision_tower(clip)
    _check_classifier(classifier, tower.output_dim)
    with torch.enable_grad():
        trace = trace_vision(clip, images.detach().requires_grad_())
        pool = [trace.pool_attention] if trace.pool_attention is not None else []
        grads = torch.autograd.grad(_predicted_logit(clip, trace, classifier), trace.attentions + pool)
    relevance = torch.eye(trace.attentions[0].shape[-1], device=grads[0].device).expand(
        images.shape[0], -1, -1
    )
    for probs, grad in zip(trace.attentions, grads):
        weighted = (grad.float() * probs.detach().float()).clamp_min(0).mean(1)  # [B, N, N]
        relevance = relevance + weighted @ relevance
    pool_row = (grads[-1].float() * pool[0].detach().float()).clamp_min(0).mean(1)[:, 0] if pool else None
    return to_pixels(trace.readout_row(relevance, pool_row), tower.grid_size, images.shape[-2:])


METHODS: dict[str, Method] = {
    "decomposition": decomposition,
    "raw attention": raw_attention,
    "rollout": rollout,
    "Grad-CAM": gradcam,
    "Chefer et al.": chefer,
}
"""Display name -> method, in the order of the comparison tables."""


def segment(
    method: Method | str,
    model: nn.Module | ClipBundle,
    images: torch.Tensor,
    classifier: torch.Tensor,
    batch_size: int = 32,
) -> torch.Tensor:
    """Apply one method (a function or a :data:`METHODS` name) to a large batch; maps [n, H, W] on the CPU."""
    if isinstance(method, str):
        if method not in METHODS:
            raise KeyError(f"Unknown method {method!r}; choose one of {list(METHODS)}.")
        method = METHODS[method]
    device = vision_tower(model).weight.device
    return torch.cat(
        [method(model, chunk.to(device), classifier.to(device)).cpu() for chunk in images.split(batch_size)]
    )
