"""Mean-ablation of direct contributions, on a cached decomposition and as a real intervention.

Components are named by the decomposition's labels: ``"embed"``, ``"mlp_3"``, ``"attn_3"`` (a whole
attention layer), ``"L3H1"`` (one head) and ``"cls_3"`` (the CLS-attends-to-CLS terms of layer 3,
all heads). Mean-ablating a component replaces it by its mean over the evaluated images.

* :func:`mean_ablate` edits the cached sum of direct terms (the paper's method): no network run,
  final LayerNorm frozen, indirect effects ignored.
* :func:`intervene` re-runs the network with the component replaced by its dataset mean *inside* the
  forward pass (every token position), so later layers and the final LayerNorm see the change. The
  gap between the two measures how much the frozen-LayerNorm, direct-effect view moves a result.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .decomposition import Decomposition, vision_tower
from .loading import ClipBundle

__all__ = ["mean_ablate", "intervene", "all_mlps", "attention_layers", "cls_terms", "heads_of"]

_LABEL = re.compile(r"^(embed|mlp_(\d+)|attn_(\d+)|cls_(\d+)|L(\d+)H(\d+))$")


def all_mlps(n_layers: int, with_embedding: bool = True) -> list[str]:
    """Every MLP (and, as in the paper's "MLPs" row, the CLS embedding term)."""
    return (["embed"] if with_embedding else []) + [f"mlp_{l}" for l in range(n_layers)]


def attention_layers(layers: Iterable[int]) -> list[str]:
    """Whole attention layers, e.g. ``attention_layers(range(8))`` for the cumulative sweep."""
    return [f"attn_{l}" for l in layers]


def cls_terms(n_layers: int) -> list[str]:
    """The CLS-to-CLS attention terms of every layer."""
    return [f"cls_{l}" for l in range(n_layers)]


def heads_of(pairs: Iterable[tuple[int, int]]) -> list[str]:
    """Labels for (layer, head) pairs, e.g. the authors' Waterbirds head lists."""
    return [f"L{l}H{h}" for l, h in pairs]


def _parse(labels: Sequence[str], n_layers: int, n_heads: int) -> list[tuple[str, int, int]]:
    """Validate labels into (kind, layer, head) triples."""
    parsed = []
    for label in labels:
        match = _LABEL.match(label)
        if not match:
            raise ValueError(f"Unknown component {label!r}: use 'embed', 'mlp_L', 'attn_L', 'cls_L' or 'LxHy'.")
        numbers = [int(g) for g in match.groups()[1:] if g is not None]
        kind = "head" if label.startswith("L") else label.split("_")[0]
        layer, head = (numbers + [0, 0])[:2]
        if kind != "embed" and not 0 <= layer < n_layers:
            raise IndexError(f"{label}: layer {layer} out of range (the model has {n_layers} layers).")
        if kind == "head" and not 0 <= head < n_heads:
            raise IndexError(f"{label}: head {head} out of range (each layer has {n_heads} heads).")
        parsed.append((kind, layer, head))
    return parsed


def _part(parts: Decomposition, kind: str, layer: int, head: int) -> torch.Tensor:
    if kind == "embed":
        return parts.embedding
    if kind == "mlp":
        return parts.mlps[:, layer]
    if kind == "attn":
        return parts.attns[:, layer]
    if kind == "cls":
        return parts.cls_to_cls[:, layer].sum(1)
    if layer not in parts.head_layers:
        raise ValueError(f"L{layer}H{head}: layer {layer} has no head detail; decompose with layers including {layer}.")
    return parts.head_terms()[:, parts.head_layers.index(layer), head]


def mean_ablate(parts: Decomposition, ablate: Sequence[str], means: Decomposition | None = None) -> torch.Tensor:
    """[B, d'] embeddings with the named components replaced by their mean (frozen LayerNorm).

    ``means`` is the decomposition the means are taken over (default: ``parts`` itself). The result
    is not renormalised: zero-shot argmax does not depend on an image embedding's norm. Overlapping
    components (a head and its whole layer) are each subtracted once, so avoid listing both.
    """
    means = parts if means is None else means
    total = parts.total().clone()
    for kind, layer, head in _parse(list(dict.fromkeys(ablate)), parts.n_layers, parts.n_heads):
        total += _part(means, kind, layer, head).mean(0) - _part(parts, kind, layer, head)
    return total


def _head_outputs(block, u: torch.Tensor, heads: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention outputs of ``heads`` at every query, before out_proj: [B, N, H', Dh], plus alpha[:, :, 0, 0]."""
    attn = block.attn
    width, n_heads = attn.embed_dim, attn.num_heads
    head_dim = width // n_heads
    qkv = F.linear(u, attn.in_proj_weight, attn.in_proj_bias).view(*u.shape[:2], 3, n_heads, head_dim)
    q, k, v = (qkv[:, :, i, list(heads)].transpose(1, 2) for i in range(3))      # [B, H', N, Dh]
    weights = (q @ k.transpose(-1, -2) * head_dim ** -0.5).softmax(-1)
    return (weights @ v).transpose(1, 2), weights[:, :, 0, 0]


def _head_write(block, layer_scale: torch.Tensor, values: torch.Tensor, heads: Sequence[int]) -> torch.Tensor:
    """What ``heads`` write to the residual stream (no bias): [B, N, W] from [B, N, H', Dh] values."""
    attn = block.attn
    head_dim = attn.embed_dim // attn.num_heads
    columns = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
    return (values.flatten(2) @ attn.out_proj.weight[:, columns].T) * layer_scale


@torch.no_grad()
def intervene(bundle: ClipBundle | torch.nn.Module, batches: Iterable[torch.Tensor] | torch.Tensor,
              ablate: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """[n, d'] normalised embeddings with the components mean-ablated inside the forward pass.

    Two passes over ``batches`` (a [n, 3, H, W] tensor, or a re-iterable of image batches such as a
    ``DataLoader``, read lazily): the first records each component's mean output at every token
    position on the clean model, the second re-runs the model with those means substituted.
    """
    clip = bundle.model if isinstance(bundle, ClipBundle) else bundle
    visual = vision_tower(clip)
    blocks = list(visual.transformer.resblocks)
    parsed = _parse(list(dict.fromkeys(ablate)), len(blocks), blocks[0].attn.num_heads)
    if isinstance(batches, torch.Tensor):
        batches = batches.split(batch_size)
    elif isinstance(batches, Iterator):
        raise TypeError("intervene reads the batches twice: pass a tensor, a list or a DataLoader, not a one-shot "
                        "iterator or generator.")
    heads_by_layer: dict[int, list[int]] = {}
    for kind, layer, head in parsed:
        if kind == "head":
            heads_by_layer.setdefault(layer, []).append(head)
    cls_layers = sorted({layer for kind, layer, _ in parsed if kind == "cls"})
    weight = visual.conv1.weight
    layer_scales = [b.ls_1(torch.ones(b.attn.embed_dim, dtype=weight.dtype, device=weight.device)) for b in blocks]
    sums: dict[str, torch.Tensor] = {}
    count = 0  # images seen in the first pass
    inputs: dict[int, torch.Tensor] = {}

    def accumulate(key: str, value: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0) + value.float().sum(0)

    def run(replace: bool) -> list[torch.Tensor]:
        nonlocal count
        mean = {key: (total / count) for key, total in sums.items()} if replace else {}
        hooks = []

        def on_output(key: str, cls_only: bool = False):
            def hook(module, args, out):
                if not replace:
                    accumulate(key, out[:, :1] if cls_only else out)
                    return None
                out = out.clone()
                if cls_only:
                    out[:, 0] = mean[key][0].to(out.dtype)
                else:
                    out[:] = mean[key].to(out.dtype)
                return out
            return hook

        def on_attention(layer: int):
            block = blocks[layer]

            def hook(module, args, out):
                out = out.clone()
                u = inputs[layer]
                head_list = heads_by_layer.get(layer, [])
                if head_list:
                    values, _ = _head_outputs(block, u, head_list)
                    if replace:
                        out += _head_write(block, layer_scales[layer], mean[f"heads{layer}"].to(values.dtype) - values, head_list)
                    else:
                        accumulate(f"heads{layer}", values)
                if layer in cls_layers:
                    every = list(range(block.attn.num_heads))
                    qkv = F.linear(u[:, :1], block.attn.in_proj_weight, block.attn.in_proj_bias)
                    v0 = qkv[..., 2 * block.attn.embed_dim:].view(u.shape[0], 1, len(every), -1)
                    _, alpha00 = _head_outputs(block, u, every)
                    term = alpha00[:, None, :, None] * v0                             # [B, 1, H, Dh]
                    if not replace:
                        accumulate(f"cls{layer}", term)
                    else:
                        out[:, :1] += _head_write(block, layer_scales[layer], mean[f"cls{layer}"].to(term.dtype) - term, every)
                return out if replace else None
            return hook

        for kind, layer, _ in parsed:
            if kind == "embed":
                hooks.append(visual.ln_pre.register_forward_hook(on_output("embed", cls_only=True)))
            elif kind in ("mlp", "attn"):
                module = blocks[layer].ls_2 if kind == "mlp" else blocks[layer].ls_1
                hooks.append(module.register_forward_hook(on_output(f"{kind}{layer}")))
        for layer in sorted(set(heads_by_layer) | set(cls_layers)):
            hooks.append(blocks[layer].ln_1.register_forward_hook(
                lambda m, a, out, layer=layer: inputs.__setitem__(layer, out)))
            hooks.append(blocks[layer].ls_1.register_forward_hook(on_attention(layer)))
        try:
            outputs = []
            for batch in batches:
                outputs.append(F.normalize(clip.encode_image(batch.to(weight.device, weight.dtype)).float(), dim=-1))
                count += 0 if replace else len(batch)
            return outputs
        finally:
            for hook in hooks:
                hook.remove()

    run(replace=False)
    return torch.cat(run(replace=True))
