"""Exact decomposition of a CLIP ViT image embedding into direct contributions.

The image embedding is ``y = ln_post(r) @ proj`` with the CLS residual stream
``r = z0 + sum_l a_l + sum_l m_l`` (``z0``: CLS token after ``ln_pre``; ``a_l``/``m_l``: attention and
MLP outputs of block ``l`` at the CLS position). Freezing the final LayerNorm's per-image mean ``mu``
and scale ``sigma`` makes ``y`` linear in the pieces: a piece ``x_k`` with share ``s_k`` maps to

    y_k = (gamma * (x_k - s_k * mu) / sigma + s_k * beta) @ proj,        sum_k s_k = 1,

so the ``y_k`` sum to ``y`` exactly. Shares follow the paper's authors: each of the ``2L + 1``
layer-level pieces (embedding, ``L`` attention layers, ``L`` MLPs) gets ``1 / (2L + 1)``; an attention
layer's share is split equally over its ``H`` heads, or over its ``N * H`` (token, head) pairs in the
spatial decomposition. A head's term is ``sum_i alpha_i W_O^h (W_V^h u_i + b_V^h) + b_O / H``: the value
bias follows the attention weights, the output bias is split equally (over ``N * H`` when spatial).
Every term is finally divided by ``||y||`` so the parts sum to the L2-normalised embedding.

The network runs unmodified (the backend's own forward); forward hooks on the modules that
:mod:`clipdecomp.towers` names read the inputs of each block, and only the CLS query row of attention is
recomputed from the block's own parameters.
"""
from __future__ import annotations

import numbers
import weakref
from dataclasses import dataclass, fields, replace
from typing import Iterable, Literal, Sequence

import torch
import torch.nn as nn

from .loading import ClipBundle
from .towers import AttentionWeights, Block, vision_tower

__all__ = ["Decomposition", "decompose", "decompose_batches", "Granularity"]

Granularity = Literal["layer", "head", "patch"]


@dataclass
class Decomposition:
    """Direct contributions to the normalised image embedding of a batch (all fp32).

    Attributes:
        embedding: [B, d'] the CLS token after ``ln_pre`` (the paper counts it with the MLPs).
        attns: [B, L, d'] each attention layer's whole contribution.
        mlps: [B, L, d'] each MLP's contribution.
        heads: [B, L', H, d'] per-head contributions of the layers in ``head_layers``;
            with ``spatial=True`` [B, L', N, H, d'] over the N key tokens (CLS first).
        cls_to_cls: [B, L, H, d'] the CLS-attends-to-CLS part of every head (token 0 of the spatial
            decomposition, with its ``1/(N H)`` share), for the paper's CLS ablation.
        norm: [B] ``||y||`` before normalisation.
        head_layers: which layers ``heads`` covers.
        grid_size: the patch grid (rows, columns); ``N = rows * columns + 1``.
    """

    embedding: torch.Tensor
    attns: torch.Tensor
    mlps: torch.Tensor
    heads: torch.Tensor
    cls_to_cls: torch.Tensor
    norm: torch.Tensor
    head_layers: tuple[int, ...]
    grid_size: tuple[int, int]
    spatial: bool

    @property
    def n_layers(self) -> int:
        return self.attns.shape[1]

    @property
    def n_heads(self) -> int:
        return self.heads.shape[-2]

    @staticmethod
    def cat(parts: Sequence["Decomposition"]) -> "Decomposition":
        """Concatenate decompositions of several batches (same model and options) along the batch axis."""
        first = parts[0]
        tensors = {f.name: torch.cat([getattr(p, f.name) for p in parts])
                   for f in fields(first) if isinstance(getattr(first, f.name), torch.Tensor)}
        return replace(first, **tensors)

    def total(self) -> torch.Tensor:
        """[B, d'] sum of every part: the L2-normalised image embedding."""
        return self.embedding + self.attns.sum(1) + self.mlps.sum(1)

    def head_terms(self) -> torch.Tensor:
        """[B, L', H, d'] per-head terms, summed over tokens when the decomposition is spatial."""
        return self.heads.sum(2) if self.spatial else self.heads

    def stack(self, granularity: Granularity = "head") -> tuple[torch.Tensor, list[str]]:
        """Stack the parts at a granularity into [B, C, d'] with C matching labels; parts sum to ``total()``.

        ``"layer"``: embed, attn_l, mlp_l. ``"head"``: attention layers in ``head_layers`` split into
        ``L{l}H{h}``. ``"patch"`` (spatial only): those heads further split into ``L{l}H{h}T{i}``
        (token ``i``; 0 is CLS).
        """
        if granularity == "patch" and not self.spatial:
            raise ValueError("granularity='patch' needs a spatial decomposition: decompose(..., spatial=True).")
        if granularity not in ("layer", "head", "patch"):
            raise ValueError(f"granularity must be 'layer', 'head' or 'patch', got {granularity!r}.")
        parts, labels = [self.embedding[:, None]], ["embed"]
        for layer in range(self.n_layers):
            if granularity == "layer" or layer not in self.head_layers:
                parts.append(self.attns[:, layer, None])
                labels.append(f"attn_{layer}")
            else:
                terms = self.heads[:, self.head_layers.index(layer)]
                if granularity == "head" and self.spatial:
                    terms = terms.sum(1)
                n_tokens = terms.shape[1] if granularity == "patch" else 0
                parts.append(terms.flatten(1, -2))
                labels += ([f"L{layer}H{h}T{i}" for i in range(n_tokens) for h in range(self.n_heads)]
                           if granularity == "patch" else [f"L{layer}H{h}" for h in range(self.n_heads)])
            parts.append(self.mlps[:, layer, None])
            labels.append(f"mlp_{layer}")
        return torch.cat(parts, dim=1), labels

    def __getitem__(self, label: str) -> torch.Tensor:
        """One part by label ("embed", "attn_3", "mlp_3", "L3H1"): [B, d'] ([B, N, d'] for a spatial head)."""
        if label == "embed":
            return self.embedding
        kind, _, index = label.partition("_")
        if kind in ("attn", "mlp") and index.isdigit():
            return (self.attns if kind == "attn" else self.mlps)[:, int(index)]
        if label.startswith("L") and "H" in label:
            layer, head = (int(x) for x in label[1:].split("H"))
            if layer not in self.head_layers:
                raise KeyError(f"{label}: layer {layer} has no head detail (head_layers={self.head_layers}).")
            return self.heads[:, self.head_layers.index(layer), ..., head, :]
        raise KeyError(f"Unknown part label {label!r}; labels look like 'embed', 'attn_3', 'mlp_3', 'L3H1'.")


def _check_layers(layers: Iterable[int] | None, n_layers: int) -> tuple[int, ...]:
    """Layer indices (negative ones count from the end) as sorted positions; wrong types, repeated
    layers and layers out of range are refused, never rounded or dropped."""
    if layers is None:
        return tuple(range(n_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a list of layer indices such as [9, 10, 11] or range(-4, 0), got {layers!r}.")
    given = list(layers)
    wrong = [l for l in given if isinstance(l, bool) or not isinstance(l, numbers.Integral)]
    if wrong:
        raise TypeError(f"layers must be integer layer indices, got {wrong[:3]!r}.")
    bad = [int(l) for l in given if not -n_layers <= l < n_layers]
    if bad:
        raise IndexError(f"layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1}).")
    chosen = [int(l) % n_layers for l in given]
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers {[int(l) for l in given]} name a layer more than once (negative indices count "
                         f"from the end of the {n_layers} layers).")
    return tuple(sorted(chosen))


@torch.no_grad()
def decompose(model: nn.Module | ClipBundle, images: torch.Tensor, spatial: bool = False,
              layers: Sequence[int] | None = None) -> Decomposition:
    """Decompose the normalised image embeddings of a preprocessed batch into direct contributions.

    Args:
        model: an open_clip CLIP (or the bundle returned by :func:`clipdecomp.load`), any dtype.
        images: [B, 3, H, W] preprocessed images.
        spatial: also split each head over the key tokens (CLS first) -> ``heads`` [B, L', N, H, d'].
        layers: layers that get per-head (and per-token) detail; others are kept per layer only.
            Negative indices count from the end (``layers=range(-4, 0)``: the last four).

    Example:
        >>> bundle = clipdecomp.load("toy")
        >>> parts = decompose(bundle, images)
        >>> torch.allclose(parts.total(), bundle.encode_image(images), atol=1e-5)
        True
    """
    tower = vision_tower(model)
    images = tower.check_images(images)
    blocks = tower.blocks
    n_layers, width = tower.n_layers, tower.width
    head_layers = _check_layers(layers, n_layers)
    share = 1.0 / (2 * n_layers + 1)

    ln_post = tower.final_norm
    f32 = dict(dtype=torch.float32, device=images.device)
    proj = tower.proj.to(**f32)
    gamma = ln_post.weight.to(**f32) if ln_post.weight is not None else torch.ones(width, **f32)
    beta = ln_post.bias.to(**f32) if ln_post.bias is not None else torch.zeros(width, **f32)
    gamma_proj = gamma[:, None] * proj  # [W, d']: the LayerNorm's scale folded into the projection
    final = _signature([ln_post.weight, ln_post.bias, tower.proj])
    readers = [_HeadReader(block, gamma_proj, final, spatial and i in head_layers, i in head_layers)
               for i, block in enumerate(blocks)]

    captured: dict[str, torch.Tensor] = {}
    hooks = [tower.embed.register_forward_hook(lambda m, i, o: captured.__setitem__("embed", o[:, 0].float())),
             ln_post.register_forward_hook(lambda m, i, o: captured.__setitem__("resid", i[0].float()))]
    for i, (block, reader) in enumerate(zip(blocks, readers)):
        hooks += [block.attn_input.register_forward_hook(lambda m, inp, out, r=reader: r.read(out)),
                  block.attn_write.register_forward_hook(
                      lambda m, inp, out, i=i: captured.__setitem__(f"attn{i}", out[:, 0].float())),
                  block.mlp_write.register_forward_hook(
                      lambda m, inp, out, i=i: captured.__setitem__(f"mlp{i}", out[:, 0].float()))]
    try:
        y = tower.features(images).float()
    finally:
        for hook in hooks:
            hook.remove()

    resid = captured["resid"]
    resid = resid[:, 0] if resid.ndim == 3 else resid  # towers that normalise every token before pooling
    mu = resid.mean(-1)
    sigma = torch.sqrt(resid.var(-1, unbiased=False) + ln_post.eps)
    offset = (beta @ proj)[None] - (mu / sigma)[:, None] * (gamma @ proj)[None]  # [B, d'] per unit of share
    norm = y.norm(dim=-1)

    def finish(raw: torch.Tensor, piece_share: float) -> torch.Tensor:
        """Raw ``x @ (gamma * proj)`` -> normalised term: divide by sigma, add the share, divide by ||y||."""
        shape = (-1,) + (1,) * (raw.ndim - 2) + (raw.shape[-1],)
        scale = (1.0 / sigma).view(-1, *([1] * (raw.ndim - 1)))
        return (raw * scale + piece_share * offset.view(shape)) / norm.view(-1, *([1] * (raw.ndim - 1)))

    n_tokens = readers[0].n_tokens
    n_heads = tower.n_heads
    attns = torch.stack([finish(captured[f"attn{i}"] @ gamma_proj, share) for i in range(n_layers)], 1)
    mlps = torch.stack([finish(captured[f"mlp{i}"] @ gamma_proj, share) for i in range(n_layers)], 1)
    cls_to_cls = torch.stack([finish(r.cls_raw, share / (n_tokens * n_heads)) for r in readers], 1)
    head_share = share / (n_tokens * n_heads) if spatial else share / n_heads
    heads = [finish(readers[i].head_raw, head_share) for i in head_layers]
    if heads:
        heads_tensor = torch.stack(heads, 1)
    else:
        heads_tensor = attns.new_zeros((images.shape[0], 0) + ((n_tokens,) if spatial else ()) + (n_heads, attns.shape[-1]))
    return Decomposition(
        embedding=finish(captured["embed"] @ gamma_proj, share), attns=attns, mlps=mlps, heads=heads_tensor,
        cls_to_cls=cls_to_cls, norm=norm, head_layers=head_layers, grid_size=tower.grid_size,
        spatial=spatial)


def decompose_batches(model: nn.Module | ClipBundle, images: torch.Tensor, batch_size: int = 64,
                      spatial: bool = False, layers: Sequence[int] | None = None,
                      progress: bool = True) -> Decomposition:
    """:func:`decompose` a large [n, 3, H, W] tensor in batches (with a progress bar), results on the CPU."""
    from tqdm.auto import tqdm

    device = model.device if isinstance(model, ClipBundle) else next(model.parameters()).device
    chunks = images.split(batch_size)
    parts = [_to_cpu(decompose(model, chunk.to(device), spatial=spatial, layers=layers))
             for chunk in tqdm(chunks, desc="decompose", disable=not progress or len(chunks) < 2)]
    return Decomposition.cat(parts)


def _to_cpu(parts: Decomposition) -> Decomposition:
    return replace(parts, **{f.name: getattr(parts, f.name).cpu() for f in fields(parts)
                             if isinstance(getattr(parts, f.name), torch.Tensor)})


_OUTPUT_MAPS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _signature(params) -> tuple:
    """Identity and version of tensors: changes when a parameter is replaced or edited in place."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params if p is not None)


def _output_maps(block: Block, weights: AttentionWeights, gamma_proj: torch.Tensor,
                 final: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``out_map`` [H, Dh, d'] and ``bias_raw`` [d'] of a block, cached until its weights change.

    ``out_map[h] = (W_O^h)^T * layer_scale @ (gamma * proj)`` maps a head's value to output space; it
    costs as much as a good part of a forward pass on large models, so it is computed once per model.
    """
    key = _signature(list(block.module.parameters())) + final
    cached = _OUTPUT_MAPS.get(block.module)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    f32 = dict(dtype=torch.float32, device=gamma_proj.device)
    layer_scale = weights.layer_scale.to(**f32)
    out_weight = weights.out.to(**f32)  # [W_out, H * Dh]
    per_head = (out_weight.T * layer_scale[None]).unflatten(0, (weights.n_heads, weights.head_dim))
    out_map = per_head @ gamma_proj
    bias_raw = (weights.out_bias.to(**f32) * layer_scale) @ gamma_proj  # the whole output bias of the layer
    _OUTPUT_MAPS[block.module] = (key, out_map, bias_raw)
    return out_map, bias_raw


class _HeadReader:
    """Recomputes one block's CLS attention row from its attention input and forms per-head raw terms.

    "Raw" terms are ``x @ (gamma * proj)`` before the frozen-LayerNorm scaling done in :func:`decompose`.
    """

    def __init__(self, block: Block, gamma_proj: torch.Tensor, final: tuple, spatial: bool, detail: bool):
        weights = block.weights()
        f32 = dict(dtype=torch.float32, device=gamma_proj.device)
        self.n_heads, self.head_dim, self.scale = weights.n_heads, weights.head_dim, weights.scale
        self.w_q, self.w_k, self.w_v = (w.to(**f32) for w in (weights.q, weights.k, weights.v))
        self.b_q, self.b_v = weights.q_bias.to(**f32), weights.v_bias.to(**f32)  # b_K cancels in the softmax
        self.out_map, self.bias_raw = _output_maps(block, weights, gamma_proj, final)
        self.spatial, self.detail = spatial, detail
        self.n_tokens = 0

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.n_heads, self.head_dim)

    def read(self, u: torch.Tensor) -> None:
        u = u.float()  # [B, N, W]: the attention input
        self.n_tokens = n = u.shape[1]
        query = self._heads(u[:, 0] @ self.w_q.T + self.b_q)                      # [B, H, Dh]
        # q . (W_K u_i + b_K) = (W_K^T q) . u_i + const: fold the query into the key weights instead of
        # computing every key (O(N W H) instead of O(N W^2)); the constant cancels in the softmax.
        folded = torch.einsum("bhd,hdw->bhw", query, self.w_k.view(self.n_heads, self.head_dim, -1))
        alpha = torch.einsum("bhw,bnw->bhn", folded, u).mul(self.scale).softmax(-1)
        bias_share = self.bias_raw / (n * self.n_heads)
        cls_value = self._heads(u[:, 0] @ self.w_v.T + self.b_v)                  # [B, H, Dh]
        self.cls_raw = torch.einsum("bh,bhd,hde->bhe", alpha[..., 0], cls_value, self.out_map) + bias_share
        if not self.detail:
            return
        if self.spatial:
            values = self._heads(u @ self.w_v.T + self.b_v)                       # [B, N, H, Dh]
            mapped = torch.einsum("bnhd,hde->bnhe", values, self.out_map)
            self.head_raw = mapped * alpha.transpose(1, 2)[..., None] + bias_share
        else:
            mixed = torch.einsum("bhn,bnw->bhw", alpha, u)                         # attention-weighted inputs
            values = torch.einsum("bhw,hdw->bhd", mixed, self.w_v.view(self.n_heads, self.head_dim, -1))
            values = values + self.b_v.view(self.n_heads, self.head_dim)          # sum(alpha) = 1 carries b_V
            self.head_raw = torch.einsum("bhd,hde->bhe", values, self.out_map) + self.bias_raw / self.n_heads
