"""Second-order effects of MLP neurons (Gandelsman, Efros & Steinhardt, ICLR 2025, arXiv 2406.04341).

Neuron ``n`` of MLP layer ``l`` writes ``p_{i,n} w_n`` into the residual stream at token ``i`` (``p``: its
post-activation value, the input of ``c_proj``; ``w_n``: column ``n`` of ``c_proj``). Its *second-order
effect* is what that write adds to the image embedding through the value path of every later attention
head, read at the CLS query, with the attention weights and every LayerNorm's mean and scale frozen at
their forward-pass values (the effect on queries, keys and later MLPs is left out):

    phi_n(I) = [ sum_{l' > l} sum_h  c^{l',h}_n(I) R^{l',h}_n / sigma_f(I)  +  kappa(I) ] / ||z(I)||

    c^{l',h}_n(I) = sum_i A^{l',h}_{0,i} p_{i,n} / sigma1^{l'}_i         weighted activations [B, L', H, N]
    R^{l',h}_n    = (gamma_f * (W_O^h W_V^h (gamma1^{l'} * w_n))) @ proj    readout [L', H, N, d'], image-free

``sigma1^{l'}_i`` is the scale of ``ln_1`` of block ``l'`` at token ``i``, ``sigma_f`` that of ``ln_post`` on
the CLS token, ``z`` the unnormalised embedding. ``kappa(I)`` [d'] gathers the *shares* of every bias
and LayerNorm mean and shift that the authors hand each neuron (the same vector for every neuron, of
size O(1/N)): the MLP's output bias is split equally over its ``N`` neurons; ``ln_1`` of block ``l'`` is
linearised as ``gamma1 * (x - mu1) / sigma1 + beta1`` with ``mu1`` and ``beta1`` split equally over the
``1 + 2 l'`` pieces of its input (embedding, ``l'`` attention layers, ``l'`` MLPs) and then over the
``N`` neurons, as are the value and output biases (the latter also over the ``H`` heads); ``ln_post``'s
mean and shift are split over the ``2L + 1`` pieces of the final residual and then further over the
``H`` heads, the ``1 + 2 l'`` input pieces and the ``N`` neurons. These are exactly the conventions of
the authors' code (pinned in ``SECOND_ORDER.md``); :func:`second_order_reference` follows their steps
literally, expanding a [B, T, N, D] tensor per head, and the tests check the two agree.

:func:`second_order` never forms that tensor: one ordinary forward pass (hooks read ``p``, each later
block's ``ln_1`` input and attention input, and ``ln_post``'s input), the CLS attention rows recomputed
from the blocks' parameters, then ``c`` [B, L', H, N] contracted with the cached readout. The readout
costs ``(D + d') D N`` multiply-adds per later layer, once per model (cached until a weight changes).
Every tower of :mod:`clipdecomp.towers` with a CLS readout works (open_clip ViTs, Hugging Face CLIP);
models in fp16 or bf16 are read in fp32 (hooks cast, accumulation in fp32).

**Units.** Library units divide by ``||z||``, like :func:`clipdecomp.decompose`, so a layer's second-order
effects sit beside its direct terms. The authors multiply by 100 (``100 (.) / ||z||``): multiply by
:data:`AUTHORS_SCALE` before comparing norms or thresholds with theirs; accuracies do not change.

Beyond the effects themselves, this module holds the paper's statistics and uses:

* :class:`SecondOrderStats`, streamed over a dataset in two passes (never the full [images, N, d']
  tensor): per-neuron mean ``b_n``, the ``top_k`` images with the largest ``||phi_n - b_n||`` and their
  vectors, the rank-1 direction ``r_n`` (:func:`rank1_directions`) and the significance threshold
  ``tau_n``; stored with the guarantees of :class:`~clipdecomp.cache.DecompositionCache` (atomic writes,
  resumable, content-keyed, locked). The command line builds it: ``python -m clipdecomp second-order``.
* :func:`layer_ablations` (mean-ablation variants, paper Sec. 3.3 and Fig. 4), :func:`neuron_segmentation`
  (a segmentation-harness method, Sec. 5.2), :func:`discover_concepts` (App. A.5) and
  :func:`adversarial_words` (Sec. 5.1); :func:`mlp_effects` gives every whole layer's effect in one pass.
  Sparse text descriptions of ``r_n`` are in :mod:`clipdecomp.sparse_texts`.

Example:
    >>> result = second_order(bundle, images, layer=3)   # toy: 4 images, 192 neurons, d' = 64
    >>> tuple(result.effects.shape)                       # ViT-B-32 at layer 9: [B, 3072, 512]
    (4, 192, 64)
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .cache import (
    IncompleteCacheError,
    StaleCacheError,
    _array_sha256,
    _exclusive,
    _Images,
    _key_differences,
    _model_fingerprint,
    _write_json,
)
from .decomposition import _signature
from .loading import ClipBundle
from .progress import progress_bar
from .seg_metrics import normalise
from .sparse_texts import SparseCodes
from .towers import Block, Tower, vision_tower

__all__ = [
    "ABLATIONS",
    "AUTHORS_SCALE",
    "READOUT_CACHE_BYTES",
    "STATS_FORMAT",
    "LayerEvaluation",
    "SecondOrder",
    "SecondOrderStats",
    "adversarial_words",
    "discover_concepts",
    "evaluate_layer",
    "layer_ablations",
    "mlp_effects",
    "neuron_activations",
    "neuron_segmentation",
    "rank1_directions",
    "second_order",
    "second_order_reference",
    "stats_key",
]

AUTHORS_SCALE = 100.0
"""Library units times this = the authors' units (their ``coefficient=100``)."""

READOUT_CACHE_BYTES = 2 << 30
"""Memory the cached readouts may hold together (oldest dropped first; the newest is always kept)."""


@dataclass
class SecondOrder:
    """Second-order effects of some neurons of one MLP layer on a batch of images (fp32, library units).

    Attributes:
        effects: [B, N', d'] ``phi_n`` of each chosen neuron (``shared`` included).
        shared: [B, d'] the part of every neuron's effect that is the same for all neurons (the bias and
            LayerNorm shares, ``kappa / ||z||``).
        embedding: [B, d'] the L2-normalised image embeddings ``z / ||z||``.
        norm: [B] ``||z||``.
        layer: the MLP layer.
        neurons: [N'] the neurons' indices in the layer.
        later_layers: the layers whose heads carry the effects.
    """

    effects: torch.Tensor
    shared: torch.Tensor
    embedding: torch.Tensor
    norm: torch.Tensor
    layer: int
    neurons: torch.Tensor
    later_layers: tuple[int, ...]

    def authors_units(self) -> torch.Tensor:
        """[B, N', d'] the effects in the authors' units, ``100 phi / ||z||`` in their notation."""
        return AUTHORS_SCALE * self.effects


# ------------------------------------------------------------------------------------------------------
# Tower access. The image tower is read only through clipdecomp.towers: hook points (attention input,
# attention and MLP writes, final norm), attention parameters per head, and the neurons' output
# projection (Block.mlp_out). Parameters are returned in fp32.
# ------------------------------------------------------------------------------------------------------


def _cls_tower(model: nn.Module | ClipBundle) -> Tower:
    """The tower of ``model``; the lens reads the CLS query row, so attention-pool readouts are refused."""
    tower = vision_tower(model)
    if tower.pool is not None:
        raise NotImplementedError(
            f"The second-order lens reads each later head at the CLS query; this {tower.backend} tower pools "
            "with "
            "an attention head over every token (no CLS token), which needs both token axes and is not "
            "implemented. Use a CLS-readout model (open_clip ViT, Hugging Face CLIP)."
        )
    return tower


def _mlp_scale(block: Block, like: torch.Tensor) -> torch.Tensor:
    """[D] the layer scale between the output projection and the residual stream (ones if there is none).

    The block's ``mlp_write`` is either a scale applied after the MLP (open_clip's ``ls_2``, timm's ``ls2``)
    or the MLP itself, which contains the projection (Hugging Face): then there is no separate scale.
    """
    projection = block.mlp_out
    ones = torch.ones(like.shape[0], dtype=like.dtype, device=like.device)
    if any(module is projection for module in block.mlp_write.modules()):
        return ones.float()
    return block.mlp_write(ones).float()


def _layer_norm(norm: nn.LayerNorm, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = norm.normalized_shape[0]
    f32 = dict(dtype=torch.float32, device=device)
    weight = norm.weight.to(**f32) if norm.weight is not None else torch.ones(width, **f32)
    bias = norm.bias.to(**f32) if norm.bias is not None else torch.zeros(width, **f32)
    return weight, bias


def _mlp_out(block: Block, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_out [D, N], b_out [D]) writing a block's neurons into the residual stream, layer scale folded in."""
    proj = block.mlp_out
    scale = _mlp_scale(block, proj.weight)
    bias = proj.bias.float() if proj.bias is not None else torch.zeros_like(scale)
    return (proj.weight.float() * scale[:, None]).to(device), (bias * scale).to(device)


def _width(block: Block) -> int:
    """The number of neurons of a block's MLP."""
    return block.mlp_out.weight.shape[1]


@dataclass
class _Attention:
    """A block's attention-input LayerNorm and attention parameters in fp32 (``Linear(x) = x W^T + b``)."""

    n_heads: int
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    b_q: torch.Tensor
    b_k: torch.Tensor
    b_v: torch.Tensor
    w_o: torch.Tensor
    b_o: torch.Tensor
    layer_scale: torch.Tensor
    scale: float

    @property
    def head_dim(self) -> int:
        return self.w_q.shape[0] // self.n_heads


def _attention(block: Block, device) -> _Attention:
    weights = block.weights()
    f32 = dict(dtype=torch.float32, device=device)
    ln_weight, ln_bias = _layer_norm(block.attn_input, device)
    return _Attention(
        weights.n_heads,
        ln_weight,
        ln_bias,
        *(
            t.to(**f32)
            for t in (
                weights.q,
                weights.k,
                weights.v,
                weights.q_bias,
                weights.k_bias,
                weights.v_bias,
                weights.out,
                weights.out_bias,
                weights.layer_scale,
            )
        ),
        weights.scale,
    )


@dataclass
class _Final:
    """The final LayerNorm and ``proj`` in fp32."""

    gamma: torch.Tensor
    beta: torch.Tensor
    eps: float
    proj: torch.Tensor


def _final(tower: Tower, device) -> _Final:
    gamma, beta = _layer_norm(tower.final_norm, device)
    return _Final(gamma, beta, tower.final_norm.eps, tower.proj.to(dtype=torch.float32, device=device))


def _readout_parameters(tower: Tower, layer: int, later: Sequence[int]) -> list[torch.Tensor]:
    """The parameters a layer's readout depends on (for the cache's signature)."""
    params = [
        *tower.blocks[layer].mlp_write.parameters(),
        *tower.blocks[layer].mlp_out.parameters(),
        *tower.final_norm.parameters(),
        tower.proj,
    ]
    for index in later:
        block = tower.blocks[index]
        params += list(block.module.parameters())  # its LayerNorm, attention and layer scale
    return params


@dataclass
class _Frozen:
    """What one forward pass froze: embeddings, activations, LayerNorm statistics, CLS attention rows."""

    features: torch.Tensor | None = None  # [B, d'] unnormalised embedding z
    final_input: torch.Tensor | None = None  # [B, D] the final LayerNorm's input at the CLS token
    activations: dict = None  # layer -> [B, T, N] the neurons' post-activation values
    ln_mean: dict = None  # later layer -> [B, T] mean of the attention input LayerNorm's input
    ln_scale: dict = None  # later layer -> [B, T] its sqrt(var + eps)
    attention: dict = None  # later layer -> [B, H, T] attention of the CLS query
    writes: dict = None  # "embed", "attn{l}", "mlp{l}" -> [B, T, D] (if asked)

    def __post_init__(self):
        for name in ("activations", "ln_mean", "ln_scale", "attention", "writes"):
            setattr(self, name, {})


def _cls_attention(u: torch.Tensor, weights: _Attention, literal: bool) -> torch.Tensor:
    """[B, H, T] attention of the CLS query over the tokens of ``u``, the attention input [B, T, D].

    The fast form folds the query into the key weights, ``q . (W_K u_i + b_K) = (W_K^T q) . u_i + const``
    (the constant cancels in the softmax); ``literal=True`` computes every key, bias included.
    """
    heads, head_dim = weights.n_heads, weights.head_dim
    query = (u[:, 0] @ weights.w_q.T + weights.b_q).view(-1, heads, head_dim)  # [B, H, dh]
    if literal:
        keys = (u @ weights.w_k.T + weights.b_k).view(*u.shape[:2], heads, head_dim)  # [B, T, H, dh]
        logits = torch.einsum("bhc,bthc->bht", query, keys)
    else:
        folded = torch.einsum("bhc,hcw->bhw", query, weights.w_k.view(heads, head_dim, -1))
        logits = torch.einsum("bhw,btw->bht", folded, u)
    return (logits * weights.scale).softmax(-1)


def _run(
    tower: Tower,
    images: torch.Tensor,
    activation_layers: Iterable[int],
    attention_layers: Iterable[int],
    literal: bool = False,
    writes: bool = False,
) -> _Frozen:
    """One unmodified forward pass with hooks that freeze what the second-order lens needs."""
    frozen = _Frozen()
    device = images.device

    def on_attention_input(index: int):
        def hook(module, inputs, output):
            x, u = inputs[0].float(), output.float()
            frozen.ln_mean[index] = x.mean(-1)
            frozen.ln_scale[index] = torch.sqrt(x.var(-1, unbiased=False) + module.eps)
            frozen.attention[index] = _cls_attention(u, _attention(tower.blocks[index], device), literal)

        return hook

    def keep(name: str):
        return lambda module, inputs, output: frozen.writes.__setitem__(name, output.float())

    hooks = [
        tower.final_norm.register_forward_hook(
            lambda m, inputs, o: setattr(frozen, "final_input", inputs[0].float())
        )
    ]
    for index in set(activation_layers):
        hooks.append(
            tower.blocks[index].mlp_out.register_forward_hook(
                lambda m, inputs, o, index=index: frozen.activations.__setitem__(index, inputs[0].float())
            )
        )
    for index in set(attention_layers):
        hooks.append(tower.blocks[index].attn_input.register_forward_hook(on_attention_input(index)))
    if writes:
        hooks.append(tower.embed.register_forward_hook(keep("embed")))
        for index, block in enumerate(tower.blocks):
            hooks += [
                block.attn_write.register_forward_hook(keep(f"attn{index}")),
                block.mlp_write.register_forward_hook(keep(f"mlp{index}")),
            ]
    try:
        frozen.features = tower.features(tower.check_images(images)).float()
    finally:
        for hook in hooks:
            hook.remove()
    final = frozen.final_input
    frozen.final_input = final[:, 0] if final.ndim == 3 else final  # towers that normalise before pooling
    return frozen


# ------------------------------------------------------------------------------------------------------
# Second-order effects: factorised (fast) and literal (the authors' steps).
# ------------------------------------------------------------------------------------------------------


def _check_layer(layer: int, n_layers: int) -> int:
    if not -n_layers <= int(layer) < n_layers:
        raise IndexError(f"layer {layer} out of range: the model has {n_layers} layers (0..{n_layers - 1}).")
    return int(layer) % n_layers


def _check_later(later_layers: Iterable[int] | None, layer: int, n_layers: int) -> tuple[int, ...]:
    if later_layers is None:
        return tuple(range(layer + 1, n_layers))
    chosen = tuple(sorted({int(i) % n_layers if -n_layers <= int(i) < 0 else int(i) for i in later_layers}))
    bad = [i for i in chosen if not layer < i < n_layers]
    if bad:
        raise IndexError(
            f"later_layers {bad} must come after the MLP layer {layer} and exist "
            f"(layers {layer + 1}..{n_layers - 1})."
        )
    return chosen


def _check_neurons(neurons: Sequence[int] | torch.Tensor | None, width: int) -> torch.Tensor:
    if neurons is None:
        return torch.arange(width)
    index = torch.as_tensor(neurons, dtype=torch.long).flatten()
    if len(index) == 0 or index.min() < 0 or index.max() >= width:
        raise IndexError(f"neurons must be a non-empty list of indices in 0..{width - 1} (the MLP width).")
    return index


_READOUTS: weakref.WeakKeyDictionary[nn.Module, OrderedDict] = weakref.WeakKeyDictionary()


@dataclass
class _Readout:
    """A layer's cached readout: ``R`` as [N', L' * H, d'] plus each later block's value-to-output map."""

    signature: tuple
    readout: torch.Tensor  # [N', L' H, d']
    out_maps: list[torch.Tensor]  # per later layer [H, dh, d']: (W_O^h)^T * ls_1 @ (gamma_f * proj)
    out_biases: list[torch.Tensor]  # per later layer [d']: (b_O * ls_1) @ (gamma_f * proj)


def _readout(tower: Tower, layer: int, neurons: torch.Tensor, later: tuple[int, ...], device) -> _Readout:
    """Build (or fetch from the cache) the image-independent readout of ``layer``'s neurons."""
    key = (layer, tuple(neurons.tolist()), later, str(device))
    signature = _signature(_readout_parameters(tower, layer, later))
    cache = _READOUTS.setdefault(tower.module, OrderedDict())
    hit = cache.get(key)
    if hit is not None and hit.signature == signature:
        cache.move_to_end(key)
        return hit
    final = _final(tower, device)
    gamma_proj = final.gamma[:, None] * final.proj  # [D, d']
    w_out = _mlp_out(tower.blocks[layer], device)[0][:, neurons.to(device)]  # [D, N']
    maps, biases, parts = [], [], []
    for index in later:
        weights = _attention(tower.blocks[index], device)
        heads, head_dim = weights.n_heads, weights.head_dim
        out_map = (weights.w_o.T * weights.layer_scale[None]).view(heads, head_dim, -1) @ gamma_proj
        values = (weights.w_v @ (weights.ln_weight[:, None] * w_out)).view(heads, head_dim, -1)  # [H, dh, N']
        parts.append(torch.einsum("hcn,hcd->nhd", values, out_map))
        maps.append(out_map)
        biases.append((weights.b_o * weights.layer_scale) @ gamma_proj)
    readout = (
        torch.cat(parts, 1) if parts else torch.zeros(len(neurons), 0, gamma_proj.shape[1], device=device)
    )
    entry = _Readout(signature, readout.contiguous(), maps, biases)
    cache[key] = entry
    while len(cache) > 1 and sum(e.readout.numel() * 4 for e in cache.values()) > READOUT_CACHE_BYTES:
        cache.popitem(last=False)
    return entry


def _final_stats(frozen: _Frozen, final: _Final) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma_f [B], offset [B, d'] per unit of share, ||z|| [B]) of the frozen ``ln_post``."""
    resid = frozen.final_input
    mu = resid.mean(-1)
    sigma = torch.sqrt(resid.var(-1, unbiased=False) + final.eps)
    offset = (final.beta @ final.proj)[None] - (mu / sigma)[:, None] * (final.gamma @ final.proj)[None]
    return sigma, offset, frozen.features.norm(dim=-1)


@torch.no_grad()
def second_order(
    model: nn.Module | ClipBundle,
    images: torch.Tensor,
    layer: int,
    *,
    neurons: Sequence[int] | torch.Tensor | None = None,
    later_layers: Iterable[int] | None = None,
) -> SecondOrder:
    """Second-order effects ``phi_n`` of MLP ``layer``'s neurons on a preprocessed batch (see module doc).

    Args:
        model: an open_clip CLIP or a :class:`~clipdecomp.ClipBundle`; any dtype (fp32 accumulation).
        images: [B, 3, H, W] preprocessed images.
        layer: the MLP layer (negative counts from the end). The last layer has no later heads: its
            effects are zero (the authors' code raises an error there).
        neurons: which neurons (default: all ``N``); the shares still divide by the full width ``N``.
        later_layers: the layers whose heads carry the effects (default: every layer after ``layer``).

    Returns:
        A :class:`SecondOrder`; ``effects.sum(1)`` over all neurons is the whole MLP output's
        second-order effect (tested).
    """
    tower = _cls_tower(model)
    layer = _check_layer(layer, tower.n_layers)
    later = _check_later(later_layers, layer, tower.n_layers)
    index = _check_neurons(neurons, _width(tower.blocks[layer]))
    return _effects(tower, _run(tower, images, [layer], later), layer, index, later)


def _effects(
    tower: Tower, frozen: _Frozen, layer: int, index: torch.Tensor, later: tuple[int, ...]
) -> SecondOrder:
    """The factorised effects from a frozen forward pass (the readout is the only per-neuron weight)."""
    device = tower.weight.device
    final = _final(tower, device)
    sigma_f, offset, norm = _final_stats(frozen, final)
    entry = _readout(tower, layer, index, later, device)
    activations = frozen.activations[layer]  # [B, T, N]
    if later:
        weights = torch.stack([frozen.attention[i] / frozen.ln_scale[i][:, None] for i in later], 1)
        c = torch.einsum("blht,btn->nblh", weights, activations[..., index.to(device)])  # [N', B, L', H]
        core = torch.bmm(c.flatten(2), entry.readout).transpose(0, 1) / sigma_f[:, None, None]
    else:
        core = activations.new_zeros(len(activations), len(index), final.proj.shape[1])
    shared = _shared_term(
        frozen, tower, layer, later, entry, final, sigma_f, offset, _width(tower.blocks[layer]), device
    )
    return SecondOrder(
        effects=(core + shared[:, None]) / norm[:, None, None],
        shared=shared / norm[:, None],
        embedding=frozen.features / norm[:, None],
        norm=norm,
        layer=layer,
        neurons=index,
        later_layers=later,
    )


def _shared_term(
    frozen: _Frozen,
    tower: Tower,
    layer: int,
    later: tuple[int, ...],
    entry: _Readout,
    final: _Final,
    sigma_f: torch.Tensor,
    offset: torch.Tensor,
    width: int,
    device,
) -> torch.Tensor:
    """``kappa`` [B, d']: a neuron's share of the MLP bias, ln_1 mean/shift, value/output biases, ln_post."""
    b_out = _mlp_out(tower.blocks[layer], device)[1]
    n_pieces = 2 * tower.n_layers + 1
    kappa = offset.new_zeros(offset.shape)
    for position, index in enumerate(later):
        weights = _attention(tower.blocks[index], device)
        share = 1.0 / ((1 + 2 * index) * width)  # of block index's input, for one neuron
        mixing = frozen.attention[index] / frozen.ln_scale[index][:, None]  # [B, H, T]
        bias_weight = mixing.sum(-1)[..., None] / width  # b_out / N
        mean_weight = (mixing * frozen.ln_mean[index][:, None]).sum(-1)[..., None] * share
        mixed = weights.ln_weight * (b_out * bias_weight - mean_weight) + weights.ln_bias * share  # [B, H, D]
        values = torch.einsum("bhw,hcw->bhc", mixed, weights.w_v.view(weights.n_heads, weights.head_dim, -1))
        values = values + share * weights.b_v.view(weights.n_heads, weights.head_dim)
        raw = (
            torch.einsum("bhc,hcd->bd", values, entry.out_maps[position]) + share * entry.out_biases[position]
        )
        kappa = kappa + raw / sigma_f[:, None] + offset * (share / n_pieces)
    return kappa


def _literal_heads(
    writes: torch.Tensor,
    share: float,
    frozen: _Frozen,
    index: int,
    weights: _Attention,
    final: _Final,
    sigma_f: torch.Tensor,
    mu_f: torch.Tensor,
    n_layers: int,
) -> torch.Tensor:
    """The authors' steps for one later block: writes [B, T, K, D] -> per-head effects [B, K, H, d'].

    Each write is ``share`` of block ``index``'s input: it gets ``share`` of ln_1's mean and shift, of the
    value bias and of the output bias (over heads, ``share / H``), and ``share / ((2L + 1) H)`` of ln_post's.
    Results are divided by ``||z||`` (library units).
    """
    mu1, sigma1 = frozen.ln_mean[index][:, :, None, None], frozen.ln_scale[index][:, :, None, None]
    normed = weights.ln_weight * (writes - share * mu1) / sigma1 + share * weights.ln_bias  # [B, T, K, D]
    heads, dh = weights.n_heads, weights.head_dim
    share_f = share / ((2 * n_layers + 1) * heads)
    norm = frozen.features.norm(dim=-1)[:, None, None]
    out = []
    for h in range(heads):
        rows = slice(h * dh, (h + 1) * dh)
        values = normed @ weights.w_v[rows].T + share * weights.b_v[rows]  # [B, T, K, dh]
        mixed = torch.einsum("bt,btkc->bkc", frozen.attention[index][:, h], values)  # CLS query row
        output = (
            mixed @ weights.w_o[:, rows].T + share * weights.b_o / heads
        ) * weights.layer_scale  # [B, K, D]
        post = (
            final.gamma * (output - share_f * mu_f[:, None, None]) / sigma_f[:, None, None]
            + share_f * final.beta
        )
        out.append(post @ final.proj / norm)
    return torch.stack(out, 2)


@torch.no_grad()
def second_order_reference(
    model: nn.Module | ClipBundle,
    images: torch.Tensor,
    layer: int,
    *,
    neurons: Sequence[int] | torch.Tensor | None = None,
    later_layers: Iterable[int] | None = None,
) -> torch.Tensor:
    """[B, N', d'] the same effects as :func:`second_order`, computed the authors' way (slow, for checks).

    Per later layer and head it expands every neuron's write ``p_{i,n} w_n + b_out / N`` to [B, T, N', D],
    applies the linearised ln_1, the head's values, the CLS attention row (recomputed with every key),
    the output projection and the linearised ln_post, then projects (their ``SecondOrderPrsNeurons``).
    Memory grows as B T N' D: use it on small models or a few images and neurons.
    """
    tower = _cls_tower(model)
    layer = _check_layer(layer, tower.n_layers)
    later = _check_later(later_layers, layer, tower.n_layers)
    width = _width(tower.blocks[layer])
    device = tower.weight.device
    index = _check_neurons(neurons, width).to(device)
    frozen = _run(tower, images, [layer], later, literal=True)
    final = _final(tower, device)
    resid = frozen.final_input
    mu_f, sigma_f = resid.mean(-1), torch.sqrt(resid.var(-1, unbiased=False) + final.eps)
    w_out, b_out = _mlp_out(tower.blocks[layer], device)
    p = frozen.activations[layer][..., index]  # [B, T, N']
    writes = p[..., None] * w_out[:, index].T + b_out / width  # [B, T, N', D]
    total = p.new_zeros(len(p), len(index), final.proj.shape[1])
    for later_layer in later:
        share = 1.0 / ((1 + 2 * later_layer) * width)
        heads = _literal_heads(
            writes,
            share,
            frozen,
            later_layer,
            _attention(tower.blocks[later_layer], device),
            final,
            sigma_f,
            mu_f,
            tower.n_layers,
        )
        total = total + heads.sum(2)
    return total


@torch.no_grad()
def mlp_effects(model: nn.Module | ClipBundle, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The second-order effect of every whole MLP layer, all neurons together, from one forward pass.

    Returns ``(effects [B, L, d'], embedding [B, d'])``: ``effects[:, l]`` is the MLP output of layer ``l``
    (bias included) read through every later head with the authors' shares, which equals
    ``second_order(model, images, l).effects.sum(1)`` (tested); the last layer's is zero. Cheap: one
    [B, T, D] write per layer instead of one per neuron, so the paper's layer comparison ("w/o all
    neurons" per layer, its Fig. 3) needs no per-neuron statistics.
    """
    tower = _cls_tower(model)
    n_layers, device = tower.n_layers, tower.weight.device
    frozen = _run(tower, images, [], range(1, n_layers), writes=True)
    final = _final(tower, device)
    resid = frozen.final_input
    mu_f, sigma_f = resid.mean(-1), torch.sqrt(resid.var(-1, unbiased=False) + final.eps)
    weights = {index: _attention(tower.blocks[index], device) for index in range(1, n_layers)}
    effects = frozen.features.new_zeros(len(resid), n_layers, final.proj.shape[1])
    writes = torch.stack(
        [frozen.writes[f"mlp{layer}"] for layer in range(n_layers - 1)], 2
    )  # [B, T, L - 1, D]
    for index in range(1, n_layers):  # every earlier MLP through block index's heads at once
        heads = _literal_heads(
            writes[:, :, :index],
            1.0 / (1 + 2 * index),
            frozen,
            index,
            weights[index],
            final,
            sigma_f,
            mu_f,
            n_layers,
        )
        effects[:, :index] += heads.sum(2)
    return effects, frozen.features / frozen.features.norm(dim=-1, keepdim=True)


@torch.no_grad()
def neuron_activations(
    model: nn.Module | ClipBundle, images: torch.Tensor, layers: Iterable[int]
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Post-activation values of every neuron of ``layers`` ([B, T, N] each, token 0 = CLS) and the
    normalised embeddings [B, d'], from one forward pass."""
    tower = _cls_tower(model)
    chosen = [_check_layer(layer, tower.n_layers) for layer in layers]
    frozen = _run(tower, images, chosen, [])
    return frozen.activations, F.normalize(frozen.features, dim=-1)


# ------------------------------------------------------------------------------------------------------
# Rank-1 model and dataset statistics.
# ------------------------------------------------------------------------------------------------------


def rank1_directions(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each neuron's rank-1 direction from its largest centred effects (the authors' ``compute_pcas.py``).

    Args:
        deltas: [N, k, d'] per neuron, the ``k`` centred effects ``phi_n - b_n`` with the largest norms.

    Returns:
        ``directions`` [N, d']: the first right singular vector of each neuron's *uncentred* [k, d'] block
        (unit norm), flipped so that more than ``k // 2`` of the ``k`` projections are positive; and
        ``explained`` [N]: the share of the block's squared norm that direction carries, ``s_1^2 / sum s^2``.
    """
    if deltas.ndim != 3:
        raise ValueError(f"deltas must be [neurons, k, d'], got {list(deltas.shape)}.")
    _, singular, vh = torch.linalg.svd(deltas.double(), full_matrices=False)
    directions = vh[:, 0]
    positive = (torch.einsum("nkd,nd->nk", deltas.double(), directions) > 0).sum(1)
    directions = torch.where((positive > deltas.shape[1] // 2)[:, None], directions, -directions)
    power = singular.pow(2)
    explained = torch.where(
        power.sum(1) > 0, power[:, 0] / power.sum(1).clamp_min(1e-300), torch.zeros_like(power[:, 0])
    )
    return directions.to(deltas.dtype), explained.to(deltas.dtype)


STATS_FORMAT = 1
_STAT_ARRAYS = (
    "mean",
    "directions",
    "thresholds",
    "explained",
    "top_norms",
    "top_images",
    "top_deltas",
    "energy",
)


def stats_key(
    bundle: ClipBundle,
    dataset,
    selection,
    *,
    layer: int,
    neurons: torch.Tensor | None,
    later_layers: tuple[int, ...],
    top_k: int,
) -> dict:
    """Everything a :class:`SecondOrderStats` folder depends on (compared key by key when reopened)."""

    tower = vision_tower(bundle)
    return {
        "format": STATS_FORMAT,
        "model": {
            "spec": bundle.spec,
            "weights": _model_fingerprint(bundle),
            "open_clip": open_clip.__version__,
            **tower.describe(),
        },
        "dataset": dataset.content_key(),
        "selection": {"n_images": len(selection), "sha256": _array_sha256(np.asarray(selection, np.int64))},
        "statistics": {
            "layer": layer,
            "neurons": None if neurons is None else [int(n) for n in neurons],
            "later_layers": list(later_layers),
            "top_k": top_k,
        },
    }


class SecondOrderStats:
    """Dataset statistics of one layer's second-order effects, in a folder (library units, fp32 on disk).

    Arrays (numpy, memory-mapped; ``N'`` neurons, ``k = top_k``):

    ==================  =============  =================================================================
    ``mean``            [N', d']       ``b_n``, the mean effect over the images
    ``directions``      [N', d']       ``r_n``, the rank-1 direction (:func:`rank1_directions`)
    ``thresholds``      [N']           ``tau_n``, the k-th largest ``||phi_n - b_n||`` (significance cut)
    ``explained``       [N']           share of the top-k block's squared norm along ``r_n``
    ``top_norms``       [N', k]        the k largest ``||phi_n - b_n||``, decreasing
    ``top_images``      [N', k]        their dataset indices
    ``top_deltas``      [N', k, d']    their vectors ``phi_n - b_n``
    ``energy``          [N']           ``sum over images of ||phi_n - b_n||^2`` (float64)
    ==================  =============  =================================================================

    A neuron is *significant* on an image when ``||phi_n - b_n|| > tau_n`` (strictly, as the authors'
    code), so on the images the statistics come from it is significant on exactly ``k - 1`` of them,
    barring ties, when their effects are recomputed in the same batches (fp32 rounding depends on a
    batch's composition, and the k-th image sits exactly on the threshold). Thresholds are in library
    units: multiply by :data:`AUTHORS_SCALE` for the authors'.

    Built by :meth:`build` in two streamed passes (means, then the top-k heaps), checkpointed every
    ``checkpoint_every`` images: a checkpoint folder is written under a temporary name and renamed, so
    a killed run resumes from its last checkpoint when built again with the same arguments. A
    ``flock`` makes a concurrent second build of the same folder fail at once; the manifest's content
    key (model weights, dataset, selection, layer, neurons, later layers, k) makes a build or
    :meth:`open` with other inputs fail with :class:`~clipdecomp.cache.StaleCacheError`.
    """

    def __init__(self, folder, manifest: dict):
        self.folder, self.manifest = folder, manifest
        for name in _STAT_ARRAYS:
            setattr(self, name, np.load(folder / "stats" / f"{name}.npy", mmap_mode="r"))

    @property
    def key(self) -> dict:
        return self.manifest["key"]

    @property
    def layer(self) -> int:
        return self.key["statistics"]["layer"]

    @property
    def later_layers(self) -> tuple[int, ...]:
        return tuple(self.key["statistics"]["later_layers"])

    @property
    def neurons(self) -> torch.Tensor:
        """[N'] the neurons covered, as indices into the layer."""
        chosen = self.key["statistics"]["neurons"]
        return torch.arange(len(self.mean)) if chosen is None else torch.tensor(chosen)

    @property
    def top_k(self) -> int:
        return self.key["statistics"]["top_k"]

    def __len__(self) -> int:
        return self.manifest["n_images"]

    def __repr__(self) -> str:
        return (
            f"SecondOrderStats({self.folder}: layer {self.layer}, {len(self.mean)} neurons, "
            f"{len(self)} images, "
            f"top {self.top_k})"
        )

    def tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One array as a torch tensor (copied out of the memory map)."""
        if name not in _STAT_ARRAYS:
            raise KeyError(f"No array {name!r}; the statistics hold {list(_STAT_ARRAYS)}.")

        return torch.from_numpy(np.array(getattr(self, name))).to(device)

    def _check(self, result: SecondOrder) -> None:
        if (
            result.layer != self.layer
            or not torch.equal(result.neurons.cpu(), self.neurons)
            or result.later_layers != self.later_layers
        ):
            raise ValueError(
                f"These statistics cover layer {self.layer}, {len(self.neurons)} neurons, later layers "
                f"{self.later_layers}; the effects are of layer {result.layer}, {len(result.neurons)} "
                f"neurons, later layers {result.later_layers}: compute them with the same options."
            )

    def centred(self, result: SecondOrder) -> torch.Tensor:
        """[B, N', d'] ``phi_n - b_n``."""
        self._check(result)
        return result.effects - self.tensor("mean", result.effects.device)

    def significant(self, result: SecondOrder) -> torch.Tensor:
        """bool [B, N']: ``||phi_n - b_n|| > tau_n``."""
        return self.centred(result).norm(dim=-1) > self.tensor("thresholds", result.effects.device)

    def projections(self, result: SecondOrder) -> torch.Tensor:
        """[B, N'] the signed coordinate ``x_n = <phi_n - b_n, r_n>`` of the rank-1 model ``b_n + x_n r_n``"""
        return torch.einsum(
            "bnd,nd->bn", self.centred(result), self.tensor("directions", result.effects.device)
        )

    @classmethod
    def open(cls, folder, expected_key: dict | None = None) -> SecondOrderStats:
        """Open finished statistics; with ``expected_key`` (see :func:`stats_key`) refuse other inputs."""
        folder = Path(folder).expanduser()
        path = folder / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} holds no second-order statistics (no manifest.json); create them with "
                "SecondOrderStats.build(...) or `python -m clipdecomp second-order`."
            )
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("kind") != "second-order" or manifest.get("format") != STATS_FORMAT:
            raise StaleCacheError(
                f"{folder} is not a second-order statistics folder of format {STATS_FORMAT}; "
                "delete it and build again (or choose another folder)."
            )
        if expected_key is not None and manifest["key"] != expected_key:
            raise StaleCacheError(
                f"The statistics in {folder} were built from different inputs: "
                + "; ".join(_key_differences(manifest["key"], expected_key))
                + ". Delete the folder to rebuild it, or build into another folder."
            )
        if manifest["status"] != "complete" or not (folder / "stats").is_dir():
            raise IncompleteCacheError(
                f"The statistics in {folder} are unfinished (was the run interrupted?). "
                "Build again with the same arguments to resume."
            )
        return cls(folder, manifest)

    @classmethod
    def cached(
        cls,
        bundle: ClipBundle,
        dataset,
        cache_dir,
        layer: int,
        *,
        top_k: int = 100,
        indices: Sequence[int] | None = None,
        **options,
    ) -> SecondOrderStats:
        """:meth:`build` into a folder of ``cache_dir`` named after the content key (model weights, images,
        layer, ``top_k``...): the same call reuses finished statistics, another model or image set gets
        its own folder. ``options`` as in :meth:`build` (neurons and later layers are part of the key)."""
        import hashlib

        tower = vision_tower(bundle)
        layer = _check_layer(layer, tower.n_layers)
        later = _check_later(options.get("later_layers"), layer, tower.n_layers)
        neurons = options.get("neurons")
        index = None if neurons is None else _check_neurons(neurons, _width(tower.blocks[layer]))
        key = stats_key(
            bundle,
            dataset,
            _check_selection(indices, len(dataset)),
            layer=layer,
            neurons=index,
            later_layers=later,
            top_k=top_k,
        )
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return cls.build(
            bundle,
            dataset,
            Path(cache_dir) / f"second-order-L{layer}-{digest}",
            layer,
            top_k=top_k,
            indices=indices,
            **options,
        )

    @classmethod
    def build(
        cls,
        bundle: ClipBundle,
        dataset,
        out_dir,
        layer: int,
        *,
        top_k: int = 100,
        neurons: Sequence[int] | None = None,
        later_layers: Iterable[int] | None = None,
        batch_size: int = 32,
        indices: Sequence[int] | None = None,
        checkpoint_every: int = 1024,
        num_workers: int = 0,
        progress: bool = True,
    ) -> SecondOrderStats:
        """Stream ``layer``'s second-order effects over ``dataset`` (or its ``indices``) into ``out_dir``.

        Args:
            bundle: the model, run on ``bundle.device``.
            dataset: a :class:`~clipdecomp.datasets.DecomposableDataset` (e.g. ``ImageFolderDataset``).
            out_dir: the folder (created; must be new, empty, or statistics of the same key, then resumed).
            layer: the MLP layer; ``neurons`` and ``later_layers`` as in :func:`second_order`.
            top_k: images kept per neuron (the authors: 100 of ~5,000); at most the number of images.
            batch_size: images per forward pass.
            indices: the distinct dataset positions to use (default: all).
            checkpoint_every: images between checkpoints (a multiple of ``batch_size`` is best).
            num_workers: DataLoader worker processes.
            progress: show progress bars.
        """

        tower = _cls_tower(bundle)
        layer = _check_layer(layer, tower.n_layers)
        later = _check_later(later_layers, layer, tower.n_layers)
        index = None if neurons is None else _check_neurons(neurons, _width(tower.blocks[layer]))
        selection = _check_selection(indices, len(dataset))
        for name, value, low in (
            ("top_k", top_k, 1),
            ("batch_size", batch_size, 1),
            ("checkpoint_every", checkpoint_every, 1),
            ("num_workers", num_workers, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if top_k > len(selection):
            raise ValueError(
                f"top_k={top_k} exceeds the {len(selection)} images: keep at most as many images per "
                "neuron as there are (the authors keep 100 of about 5,000)."
            )
        if not later:
            raise ValueError(
                f"Layer {layer} is the last one: its neurons have no later heads, so every second-order "
                "effect is zero and there is nothing to fit. Choose an earlier layer."
            )
        key = stats_key(
            bundle, dataset, selection, layer=layer, neurons=index, later_layers=later, top_k=top_k
        )
        build = _StatsBuild(
            Path(out_dir).expanduser(), key, bundle, dataset, selection, layer, index, later, top_k
        )
        build.run(batch_size, checkpoint_every, num_workers, progress)
        return cls.open(build.folder, expected_key=key)


def _check_selection(indices, n: int):

    if indices is None:
        return np.arange(n, dtype=np.int64)
    selection = np.asarray(list(indices))
    if selection.ndim != 1 or len(selection) == 0 or selection.dtype.kind not in "iu":
        raise ValueError("indices must be a non-empty 1-D list of integer dataset positions.")
    if selection.min() < 0 or selection.max() >= n or len(np.unique(selection)) != len(selection):
        raise ValueError(f"indices must be distinct positions in 0..{n - 1}.")
    return selection.astype(np.int64)


class _StatsBuild:
    """The two streamed passes of :meth:`SecondOrderStats.build`, with atomic checkpoints.

    Folder: ``manifest.json``; ``checkpoint_{pass}_{position:09d}/`` (the state after ``position``
    images of pass 1 or 2; only the newest is kept); ``stats/`` once finished. Everything is written
    under a temporary name and renamed into place.
    """

    def __init__(self, folder, key, bundle, dataset, selection, layer, neurons, later, top_k):
        self.folder, self.key, self.bundle, self.dataset = folder, key, bundle, dataset
        self.selection = selection
        self.layer, self.neurons, self.later, self.top_k = layer, neurons, later, top_k

    def _manifest(self) -> dict:
        path = self.folder / "manifest.json"
        if path.is_file():
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if manifest.get("kind") != "second-order" or manifest.get("key") != self.key:
                raise StaleCacheError(
                    f"{self.folder} holds statistics built from different inputs: "
                    + "; ".join(_key_differences(manifest.get("key", {}), self.key))
                    + ". Delete the folder to rebuild it, or build into another folder."
                )
            return manifest
        strangers = [p.name for p in self.folder.iterdir() if not p.name.startswith(".")]
        if strangers:
            raise FileExistsError(
                f"{self.folder} is not empty and holds no second-order statistics (has "
                f"{strangers[:5]}); choose a new or empty folder."
            )
        manifest = {
            "kind": "second-order",
            "format": STATS_FORMAT,
            "status": "building",
            "key": self.key,
            "n_images": len(self.selection),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        _write_json(path, manifest)
        return manifest

    def _save(self, name: str, arrays: dict) -> None:
        """Write ``arrays`` into folder ``name`` atomically (temporary folder, then rename)."""
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for key, value in arrays.items():
                np.save(tmp / f"{key}.npy", value)
            if (self.folder / name).is_dir():  # left by a run killed before it marked the build complete
                shutil.rmtree(self.folder / name)
            os.replace(tmp, self.folder / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _latest(self) -> tuple[int, int, dict]:
        """(pass, position, state) of the newest complete checkpoint, or (1, 0, {}) to start afresh."""
        found = sorted(p.name for p in self.folder.glob("checkpoint_[12]_*") if p.is_dir())
        if not found:
            return 1, 0, {}
        name = found[-1]
        state = {p.stem: np.load(p) for p in (self.folder / name).glob("*.npy")}
        return int(name.split("_")[1]), int(name.split("_")[2]), state

    def _checkpoint(self, pass_: int, position: int, state: dict) -> None:
        name = f"checkpoint_{pass_}_{position:09d}"
        self._save(name, state)
        for old in self.folder.glob("checkpoint_[12]_*"):
            if old.name != name:
                shutil.rmtree(old)

    def _batches(self, start: int, batch_size: int, every: int):
        """Position ranges [a, b) from ``start``; none crosses a checkpoint boundary."""
        n = len(self.selection)
        position = start
        while position < n:
            stop = min(n, (position // every + 1) * every, position + batch_size)
            yield position, stop
            position = stop

    def _effects(self, batch_size: int, every: int, start: int, num_workers: int, progress: bool, desc: str):
        """Yield ``(position, stop, effects [b, N', d'])`` over the selection from ``start``."""
        plan = list(self._batches(start, batch_size, every))
        images = _Images(self.dataset, tuple(vision_tower(self.bundle).image_size))
        sampler = [self.selection[a:b].tolist() for a, b in plan]
        loader = torch.utils.data.DataLoader(images, batch_sampler=sampler, num_workers=num_workers)
        with progress_bar(
            show=progress, total=len(self.selection), initial=start, unit="img", desc=desc
        ) as bar:
            for (a, b), batch in zip(plan, loader):
                result = second_order(
                    self.bundle,
                    batch.to(self.bundle.device),
                    self.layer,
                    neurons=self.neurons,
                    later_layers=self.later,
                )
                if not torch.isfinite(result.effects).all():
                    raise FloatingPointError(
                        f"Non-finite second-order effects on images at positions {a}..{b - 1}: "
                        "check those images and the model's dtype."
                    )
                bar.update(b - a)
                yield a, b, result.effects

    def run(self, batch_size: int, every: int, num_workers: int, progress: bool) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.folder):
            manifest = self._manifest()
            if manifest["status"] == "complete" and (self.folder / "stats").is_dir():
                return
            for leftover in self.folder.glob(".*.tmp-*"):
                if leftover.is_dir():
                    shutil.rmtree(leftover)
            stage, position, state = self._latest()
            n = len(self.selection)
            if stage == 1:
                total = state.get("sum")
                for a, b, effects in self._effects(
                    batch_size, every, position, num_workers, progress, "means"
                ):
                    block = effects.double().sum(0).cpu().numpy()
                    total = block if total is None else total + block
                    if b % every == 0 or b == n:
                        self._checkpoint(1, b, {"sum": total})
                state, position = {"mean": (total / n).astype(np.float32)}, 0
                self._checkpoint(2, 0, state)
            state = self._top_pass(state, batch_size, every, position, num_workers, progress)
            self._save("stats", self._finish(state))
            manifest.update(status="complete", finished=datetime.datetime.now().isoformat(timespec="seconds"))
            _write_json(self.folder / "manifest.json", manifest)
            for old in self.folder.glob("checkpoint_[12]_*"):
                shutil.rmtree(old)

    def _top_pass(
        self, state: dict, batch_size: int, every: int, start: int, num_workers: int, progress: bool
    ) -> dict:
        """Pass 2: per neuron, the ``top_k`` largest ``||phi - b||`` with their positions and vectors."""

        mean = torch.from_numpy(state["mean"])
        n_neurons, dim = mean.shape
        k, n = self.top_k, len(self.selection)
        norms = (
            torch.from_numpy(state["top_norms"]) if "top_norms" in state else torch.full((n_neurons, k), -1.0)
        )
        where = (
            torch.from_numpy(state["top_positions"])
            if "top_positions" in state
            else torch.full((n_neurons, k), -1)
        )
        deltas = (
            torch.from_numpy(state["top_deltas"]) if "top_deltas" in state else torch.zeros(n_neurons, k, dim)
        )
        energy = (
            torch.from_numpy(state["energy"])
            if "energy" in state
            else torch.zeros(n_neurons, dtype=torch.float64)
        )
        for a, b, effects in self._effects(batch_size, every, start, num_workers, progress, "top images"):
            delta = effects.cpu() - mean  # [b, N', d']
            size = delta.norm(dim=-1)  # [b, N']
            energy += size.double().pow(2).sum(0)
            for lo in range(0, n_neurons, 512):  # bounded temporaries
                hi = min(n_neurons, lo + 512)
                pooled = torch.cat([norms[lo:hi], size[:, lo:hi].T], 1)
                order = pooled.argsort(dim=1, descending=True, stable=True)[:, :k]
                positions = torch.cat([where[lo:hi], torch.arange(a, b).expand(hi - lo, -1)], 1)
                vectors = torch.cat([deltas[lo:hi], delta[:, lo:hi].transpose(0, 1)], 1)
                norms[lo:hi], where[lo:hi] = pooled.gather(1, order), positions.gather(1, order)
                deltas[lo:hi] = vectors.gather(1, order[..., None].expand(-1, -1, dim))
            if b % every == 0 or b == n:
                self._checkpoint(
                    2,
                    b,
                    {
                        "mean": state["mean"],
                        "top_norms": norms.numpy(),
                        "top_positions": where.numpy(),
                        "top_deltas": deltas.numpy(),
                        "energy": energy.numpy(),
                    },
                )
        return {
            "mean": state["mean"],
            "top_norms": norms.numpy(),
            "top_positions": where.numpy(),
            "top_deltas": deltas.numpy(),
            "energy": energy.numpy(),
        }

    def _finish(self, state: dict) -> dict:
        """The stored arrays: rank-1 directions and thresholds from the kept top-k vectors."""
        deltas = torch.from_numpy(state["top_deltas"])
        directions, explained = rank1_directions(deltas)
        return {
            "mean": state["mean"],
            "directions": directions.numpy(),
            "explained": explained.numpy(),
            "thresholds": state["top_norms"][:, -1].copy(),
            "top_norms": state["top_norms"],
            "top_images": self.selection[state["top_positions"]],
            "top_deltas": state["top_deltas"],
            "energy": state["energy"],
        }


# ------------------------------------------------------------------------------------------------------
# The paper's uses: ablations, segmentation, concept discovery, adversarial words.
# ------------------------------------------------------------------------------------------------------

ABLATIONS = ("original", "mean-ablated", "insignificant kept", "significant kept", "rank-1 kept")
"""The variants of :func:`layer_ablations` (plus one per reconstruction it is given)."""


def layer_ablations(
    result: SecondOrder, stats: SecondOrderStats, reconstructions: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The paper's mean-ablation variants of one layer's second-order effects ([B, d'] each, library units).

    Every variant starts from the embedding with each neuron's effect replaced by its dataset mean,
    ``z/||z|| - sum_n phi_n + sum_n b_n`` (``"mean-ablated"``), and adds back part of the centred effects
    ``delta_n = phi_n - b_n``: only the neurons that are not significant on the image
    (``"insignificant kept"``; the paper's "w/o large norm"), only the significant ones
    (``"significant kept"``), or the rank-1 reconstructions ``<delta_n, r_n> r_n`` (``"rank-1 kept"``).
    Each entry ``name -> r_hat`` [N', d'] of ``reconstructions`` (e.g. sparse text reconstructions of the
    directions, :meth:`clipdecomp.sparse_texts.SparseCodes.reconstruct`) adds a variant ``name`` keeping
    ``<delta_n, r_hat_n> r_hat_n``, not divided by ``||r_hat_n||^2`` (as the authors' code).
    ``result`` must cover all of the layer's neurons for the ablation to remove the whole layer.
    """
    delta = stats.centred(result)
    mean = stats.tensor("mean", delta.device)
    base = result.embedding - result.effects.sum(1) + mean.sum(0)
    significant = delta.norm(dim=-1) > stats.tensor("thresholds", delta.device)
    directions = stats.tensor("directions", delta.device)
    out = {
        "original": result.embedding,
        "mean-ablated": base,
        "insignificant kept": base + (delta * ~significant[..., None]).sum(1),
        "significant kept": base + (delta * significant[..., None]).sum(1),
        "rank-1 kept": base + torch.einsum("bnd,nd->bn", delta, directions) @ directions,
    }
    for name, texts in (reconstructions or {}).items():
        texts = texts.to(delta)
        out[name] = base + torch.einsum("bnd,nd->bn", delta, texts) @ texts
    return out


@dataclass
class LayerEvaluation:
    """One layer's second-order effects on a set of images, reduced as they stream (:func:`evaluate_layer`).

    Attributes:
        ablations: variant -> [n, d'] edited embeddings (see :func:`layer_ablations`).
        projections: [n, N'] ``x_n = <phi_n - b_n, r_n>`` per image and neuron.
        active: [n] how many neurons are significant on each image.
        rank1_share: [N'] over these images, ``sum x_n^2 / sum ||phi_n - b_n||^2``: the share of each
            neuron's centred effects that its rank-1 direction carries (1 = exactly rank 1).
    """

    ablations: dict[str, torch.Tensor]
    projections: torch.Tensor
    active: torch.Tensor
    rank1_share: torch.Tensor


def evaluate_layer(
    model: nn.Module | ClipBundle,
    batches: Iterable[torch.Tensor],
    stats: SecondOrderStats,
    reconstructions: Mapping[str, torch.Tensor] | None = None,
) -> LayerEvaluation:
    """Stream ``stats``' layer over preprocessed image ``batches``, keeping only small reductions.

    Memory is O(n (d' + N')), never the [n, N', d'] effects; ``reconstructions`` as in :func:`layer_ablations`
    """
    ablations, projections, active = {}, [], []
    power = centred = 0.0
    for images in batches:
        result = second_order(
            model,
            images.to(vision_tower(model).weight.device),
            stats.layer,
            neurons=stats.neurons,
            later_layers=stats.later_layers,
        )
        for name, edited in layer_ablations(result, stats, reconstructions).items():
            ablations.setdefault(name, []).append(edited.cpu())
        x = stats.projections(result)
        size = stats.centred(result).norm(dim=-1)
        projections.append(x.cpu())
        active.append((size > stats.tensor("thresholds", size.device)).sum(1).cpu())
        power, centred = power + x.double().pow(2).sum(0).cpu(), centred + size.double().pow(2).sum(0).cpu()
    if not projections:
        raise ValueError("evaluate_layer got no image batches.")
    share = torch.where(centred > 0, power / centred.clamp_min(1e-300), torch.zeros_like(centred)).float()
    return LayerEvaluation(
        {name: torch.cat(parts) for name, parts in ablations.items()},
        torch.cat(projections),
        torch.cat(active),
        share,
    )


Method = Callable[[nn.Module | ClipBundle, torch.Tensor, torch.Tensor], torch.Tensor]


def neuron_segmentation(directions: Mapping[int, torch.Tensor], n_neurons: int = 200) -> Method:
    """A segmentation-harness method from neurons (Sec. 5.2): ``(model, images, classifier) -> [B, H, W]``.

    Per image: the zero-shot predicted class ``c``; the ``n_neurons`` neurons of the given layers whose
    rank-1 directions are most aligned with it, by ``|<r_n, classifier_c>|``; the plain mean of their
    post-activation values at each patch (CLS dropped, no sign or weight); the patch grid upsampled
    bilinearly to the image size and min-max normalised (not clipped), as the authors' code.

    Args:
        directions: layer -> [N, d'] rank-1 directions of all its neurons (``stats.tensor("directions")``;
            the authors use layers 8-10 of ViT-B-32).
        n_neurons: how many neurons to average (the authors: 200 of 3 x 3,072).
    """
    layers = sorted(directions)
    if not layers:
        raise ValueError("neuron_segmentation needs the rank-1 directions of at least one layer.")
    table = torch.cat([torch.as_tensor(directions[layer]).float() for layer in layers])  # [L N, d']
    if not isinstance(n_neurons, int) or not 1 <= n_neurons <= len(table):
        raise ValueError(f"n_neurons must be an integer in 1..{len(table)}, got {n_neurons!r}.")

    @torch.no_grad()
    def neurons(
        model: nn.Module | ClipBundle, images: torch.Tensor, classifier: torch.Tensor
    ) -> torch.Tensor:
        tower = vision_tower(model)
        if classifier.ndim != 2 or classifier.shape[0] != table.shape[1]:
            raise ValueError(
                f"classifier must be [d'={table.shape[1]}, classes], got {list(classifier.shape)}."
            )
        activations, embedding = neuron_activations(model, images, layers)
        predicted = (embedding @ classifier.to(embedding)).argmax(1)
        alignment = (table.to(embedding) @ classifier.to(embedding)[:, predicted]).abs()  # [L N, B]
        chosen = alignment.topk(n_neurons, dim=0).indices.T  # [B, n]
        patches = torch.cat([activations[layer][:, 1:] for layer in layers], -1)  # [B, P, L N]
        scores = patches.gather(2, chosen[:, None].expand(-1, patches.shape[1], -1)).mean(-1)  # [B, P]
        grid = scores.reshape(len(scores), 1, *tower.grid_size)
        maps = F.interpolate(grid, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
        return normalise(maps)

    neurons.__name__ = neurons.__qualname__ = f"neuron_segmentation(layers={layers}, n_neurons={n_neurons})"
    return neurons


def discover_concepts(
    result: SecondOrder, stats: SecondOrderStats, codes: SparseCodes, k: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts that explain each image (paper App. A.5): ([B, k] pool indices, [B, k] scores).

    The neurons *active* on an image are the significant ones (``||phi_n - b_n|| > tau_n``). A text's
    score is ``sum over active n of gamma^n_j ||phi_n - b_n||``, with ``gamma^n`` neuron ``n``'s sparse
    code (:func:`clipdecomp.sparse_texts.omp` of ``r_n``, one row per neuron of ``stats``).
    """
    if len(codes) != len(stats.neurons):
        raise ValueError(
            f"codes has {len(codes)} rows but the statistics cover {len(stats.neurons)} neurons: "
            "encode stats.directions (one code per neuron)."
        )
    size = stats.centred(result).norm(dim=-1)  # [B, N']
    weight = size * (size > stats.tensor("thresholds", size.device))
    used = codes.atoms >= 0
    contribution = weight[:, :, None] * (codes.coefficients * used).to(weight)[None]  # [B, N', m]
    scores = weight.new_zeros(len(weight), codes.n_pool)
    scores.index_add_(1, codes.atoms.clamp_min(0).flatten().to(weight.device), contribution.flatten(1))
    top = scores.topk(min(k, codes.n_pool), dim=1)
    return top.indices, top.values


def adversarial_words(
    direction: torch.Tensor,
    directions: torch.Tensor,
    codes: SparseCodes,
    *,
    n_neurons: int = 100,
    n_words: int = 25,
    exclude: Sequence[int] = (),
    combine: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Words whose neurons push the embedding along ``direction`` (Sec. 5.1): ([n_words] indices, scores).

    ``direction`` is ``v = text(wrong class) - text(true class)`` (normalised class-name embeddings).
    The neurons are the ``n_neurons`` with the largest ``|<v, r_n>|`` among ``directions`` [N, d'] (e.g.
    layers 8-10 stacked; ``codes`` has one row per neuron in the same order). A word's score is the
    paper's Eq. 6, ``sum over those n of gamma^n_j <v, r_n>`` (``combine="sum"``), or, as the authors'
    code ranks (word, neuron) pairs, its best single pair (``combine="max"``). ``exclude`` drops pool
    indices (e.g. the class names and their synonyms).
    """
    if combine not in ("sum", "max"):
        raise ValueError(
            f"combine must be 'sum' (paper Eq. 6) or 'max' (the authors' code), got {combine!r}."
        )
    if len(codes) != len(directions):
        raise ValueError(f"codes has {len(codes)} rows for {len(directions)} neuron directions.")
    push = directions.float() @ direction.float().to(directions.device)  # [N]
    chosen = push.abs().topk(min(n_neurons, len(push))).indices
    atoms, coefficients = codes.atoms[chosen], codes.coefficients[chosen].float()
    pairs = coefficients * push[chosen, None].to(coefficients)  # [n, m]
    used = atoms >= 0
    if combine == "sum":
        scores = pairs.new_zeros(codes.n_pool).index_add_(0, atoms[used], pairs[used])
    else:
        scores = pairs.new_full((codes.n_pool,), -torch.inf).scatter_reduce_(
            0, atoms[used], pairs[used], "amax"
        )
    scores[torch.as_tensor(list(exclude), dtype=torch.long)] = -torch.inf
    top = scores.topk(min(n_words, int(torch.isfinite(scores).sum())))
    return top.indices, top.values
