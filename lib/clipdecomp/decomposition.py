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

Attention-pool readouts (SigLIP: no CLS token; ``o = sum_{h,i} a^h_i W_O^h W_V^h u_i + c_0`` over every
token ``i`` with ``u_i`` the final LayerNorm's output, then ``y = o + MLP(LN(o))``) are linear in every
token given the frozen pool attention ``a`` and the per-token LayerNorm statistics, so every trunk
piece is carried through the pool exactly: it contributes ``sum_h sum_i a^h_i W_O^h W_V^h (gamma *
(x_i - s mu_i) / sigma_i + s beta) + s c_0`` (the embedding counts as one of the ``2L + 1`` pieces).
The pool's MLP is nonlinear; ``pool_mlp="direct"`` (default) keeps it as one extra component,
``pool_mlp="linearised"`` freezes its activation gates (``act(h) = g * h`` with ``g`` fixed at this
image's values), which makes it affine, ``m = J o + m_0``, and applies ``I + J`` to every term and
shares ``m_0`` like ``c_0``. Both sum exactly to the pooled output. The readout's own split, per pool
head and token, ``a^h_i W_O^h W_V^h u_i + c_0 / (N H')``, is returned beside (``pool_heads``).

The network runs unmodified (the backend's own forward); forward hooks on the modules that
:mod:`clipdecomp.towers` names read the inputs of each block, and attention probabilities are
recomputed from each block's own parameters (only the CLS query row for CLS readouts).
"""

from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterable, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .components import parse_label
from .loading import ClipBundle
from .towers import AttentionWeights, Block, Pool, Tower, vision_tower

__all__ = ["Decomposition", "decompose", "decompose_batches", "Granularity", "PoolMLP"]

Granularity = Literal["layer", "head", "patch"]
PoolMLP = Literal["direct", "linearised"]


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
        readout: ``"cls"`` (CLIP) or ``"map"`` (an attention pool reads every token: SigLIP). Towers
            without a CLS token keep the token layout of the others: token 0 is an all-zero slot (and
            ``cls_to_cls`` is all zeros), so patch ``i`` is token ``i + 1`` on every backend.
        pool_heads: attention pools only: the pooled output split per pool head [B, H', d'] (spatial:
            per token and head [B, N, H', d']); with ``pool_mlp`` they sum to ``total()`` too.
        pool_mlp: attention pools decomposed with ``pool_mlp="direct"``: [B, d'] the pool MLP's
            output, a component of ``total()``; None otherwise.
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
    readout: str = "cls"
    pool_heads: torch.Tensor | None = None
    pool_mlp: torch.Tensor | None = None

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
        tensors = {
            f.name: torch.cat([getattr(p, f.name) for p in parts])
            for f in fields(first)
            if isinstance(getattr(first, f.name), torch.Tensor)
        }
        return replace(first, **tensors)

    def total(self) -> torch.Tensor:
        """[B, d'] sum of every part: the L2-normalised image embedding."""
        total = self.embedding + self.attns.sum(1) + self.mlps.sum(1)
        return total if self.pool_mlp is None else total + self.pool_mlp

    def invariants(self, embedding: torch.Tensor) -> dict[str, float]:
        """The largest error of each identity the parts satisfy, given the backend's own normalised
        ``embedding`` [B, d']: all parts vs the embedding; each detailed layer's heads (summed over
        tokens when spatial) vs the layer; for attention pools, the readout's own split vs the embedding.
        """
        errors = {"parts vs embedding": (self.total() - embedding.to(self.attns)).abs().max().item()}
        if self.head_layers:
            layers = self.attns[:, list(self.head_layers)]
            errors["heads vs their layer"] = (self.head_terms().sum(2) - layers).abs().max().item()
        if self.pool_heads is not None:
            pooled = self.pool_heads.flatten(1, -2).sum(1) + (0 if self.pool_mlp is None else self.pool_mlp)
            errors["pool heads (+ pool MLP) vs embedding"] = (
                (pooled - embedding.to(self.attns)).abs().max().item()
            )
        return errors

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
            raise ValueError(
                "granularity='patch' needs a spatial decomposition: decompose(..., spatial=True)."
            )
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
                labels += (
                    [f"L{layer}H{h}T{i}" for i in range(n_tokens) for h in range(self.n_heads)]
                    if granularity == "patch"
                    else [f"L{layer}H{h}" for h in range(self.n_heads)]
                )
            parts.append(self.mlps[:, layer, None])
            labels.append(f"mlp_{layer}")
        if self.pool_mlp is not None:  # an attention pool's MLP, kept as its own component
            parts.append(self.pool_mlp[:, None])
            labels.append("pool_mlp")
        return torch.cat(parts, dim=1), labels

    def __getitem__(self, label: str) -> torch.Tensor:
        """One part by its label (:mod:`clipdecomp.components`): any label ``stack`` emits, and ``cls_3``.

        Returns [B, d'], except a head of a spatial decomposition ("L3H1"): [B, N, d'] over its key
        tokens (``.sum(1)`` is the head's term; "L3H1T5" picks one token).
        """
        n_tokens = self.heads.shape[2] if self.spatial else None
        c = parse_label(label, self.n_layers, self.n_heads, n_tokens)
        if c.kind == "embed":
            return self.embedding
        if c.kind == "pool_mlp":
            if self.pool_mlp is None:
                raise KeyError(f"{label}: this decomposition has no separate pool MLP component.")
            return self.pool_mlp
        if c.kind in ("attn", "mlp"):
            return (self.attns if c.kind == "attn" else self.mlps)[:, c.layer]
        if c.kind == "cls":
            return self.cls_to_cls[:, c.layer].sum(1)
        if c.layer not in self.head_layers:
            raise KeyError(f"{label}: layer {c.layer} has no head detail (head_layers={self.head_layers}).")
        if c.kind == "token" and not self.spatial:
            raise KeyError(
                f"{label}: per-token parts need a spatial decomposition: decompose(..., spatial=True)."
            )
        heads = self.heads[:, self.head_layers.index(c.layer)]
        return heads[:, c.token, c.head] if c.kind == "token" else heads[..., c.head, :]


def _check_layers(layers: Iterable[int] | None, n_layers: int) -> tuple[int, ...]:
    """Layer indices (negative ones count from the end) as sorted positions; wrong types, repeated
    layers and layers out of range are refused, never rounded or dropped."""
    if layers is None:
        return tuple(range(n_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(
            f"layers must be a list of layer indices such as [9, 10, 11] or range(-4, 0), got {layers!r}."
        )
    given = list(layers)
    wrong = [l for l in given if isinstance(l, bool) or not isinstance(l, numbers.Integral)]
    if wrong:
        raise TypeError(f"layers must be integer layer indices, got {wrong[:3]!r}.")
    bad = [int(l) for l in given if not -n_layers <= l < n_layers]
    if bad:
        raise IndexError(f"layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1}).")
    chosen = [int(l) % n_layers for l in given]
    if len(set(chosen)) != len(chosen):
        raise ValueError(
            f"layers {[int(l) for l in given]} name a layer more than once (negative indices count "
            f"from the end of the {n_layers} layers)."
        )
    return tuple(sorted(chosen))


@torch.no_grad()
def decompose(
    model: nn.Module | ClipBundle,
    images: torch.Tensor,
    spatial: bool = False,
    layers: Sequence[int] | None = None,
    pool_mlp: PoolMLP = "direct",
) -> Decomposition:
    """Decompose the normalised image embeddings of a preprocessed batch into direct contributions.

    Args:
        model: a CLIP or SigLIP model (open_clip, Hugging Face or timm; see :mod:`clipdecomp.towers`) or
            the bundle returned by :func:`clipdecomp.load`, any dtype.
        images: [B, 3, H, W] preprocessed images.
        spatial: also split each head over the key tokens (CLS first) -> ``heads`` [B, L', N, H, d'].
        layers: layers that get per-head (and per-token) detail; others are kept per layer only.
            Negative indices count from the end (``layers=range(-4, 0)``: the last four).
        pool_mlp: attention-pool towers only: ``"direct"`` keeps the pool's MLP as its own component,
            ``"linearised"`` spreads it over every term with its activation gates frozen.

    Example:
        >>> bundle = clipdecomp.load("toy")
        >>> parts = decompose(bundle, images)
        >>> torch.allclose(parts.total(), bundle.encode_image(images), atol=1e-5)
        True
    """
    tower = vision_tower(model)
    images = tower.check_images(images)
    head_layers = _check_layers(layers, tower.n_layers)
    if pool_mlp not in ("direct", "linearised"):
        raise ValueError(f"pool_mlp must be 'direct' or 'linearised', got {pool_mlp!r}.")
    readers = [
        _LayerReader(block, tower.has_cls, i in head_layers, spatial) for i, block in enumerate(tower.blocks)
    ]
    captured, features = _capture(tower, images, readers)
    if tower.has_cls:
        readout = _cls_readout(tower, captured["final"], features)
    else:
        readout = _map_readout(tower, captured["final"], features, pool_mlp, spatial)

    n_layers, n_heads = tower.n_layers, tower.n_heads
    share = 1.0 / (2 * n_layers + 1)
    piece = lambda name: readout.finish(readout.read(captured[name]), share)  # noqa: E731 (one line)
    attns = torch.stack([piece(f"attn{i}") for i in range(n_layers)], 1)
    mlps = torch.stack([piece(f"mlp{i}") for i in range(n_layers)], 1)
    if tower.has_cls:
        cls_to_cls = torch.stack([readers[i].cls_term(readout, share) for i in range(n_layers)], 1)
    else:
        cls_to_cls = attns.new_zeros(attns.shape[:2] + (n_heads, attns.shape[-1]))
    n_tokens = tower.grid_size[0] * tower.grid_size[1] + 1
    if spatial:  # the largest result, taken after the forward pass has freed its activations
        heads = attns.new_empty((images.shape[0], len(head_layers), n_tokens, n_heads, attns.shape[-1]))
        first = 0 if tower.has_cls else 1  # towers without a CLS token: token 0 stays an all-zero slot
        heads[:, :, :first] = 0
        for slot, i in enumerate(head_layers):
            readers[i].write_patch_terms(readout, share, heads[:, slot, first:])  # never stacked copies
    else:
        per_layer = [readers[i].head_terms(readout, share) for i in head_layers]
        heads = (
            torch.stack(per_layer, 1)
            if per_layer
            else attns.new_zeros((images.shape[0], 0, n_heads, attns.shape[-1]))
        )
    return Decomposition(
        embedding=piece("embed"),
        attns=attns,
        mlps=mlps,
        heads=heads,
        cls_to_cls=cls_to_cls,
        norm=readout.norm,
        head_layers=head_layers,
        grid_size=tower.grid_size,
        spatial=spatial,
        readout=tower.readout,
        pool_heads=readout.pool_heads,
        pool_mlp=readout.pool_mlp,
    )


def decompose_batches(
    model: nn.Module | ClipBundle,
    images: torch.Tensor,
    batch_size: int = 64,
    spatial: bool = False,
    layers: Sequence[int] | None = None,
    progress: bool = True,
) -> Decomposition:
    """:func:`decompose` a large [n, 3, H, W] tensor in batches (with a progress bar), results on the CPU."""
    from .progress import progress_bar

    device = vision_tower(model).weight.device
    chunks = images.split(batch_size)
    parts = [
        _to_cpu(decompose(model, chunk.to(device), spatial=spatial, layers=layers))
        for chunk in progress_bar(chunks, show=progress and len(chunks) > 1, desc="decompose")
    ]
    return Decomposition.cat(parts)


def _to_cpu(parts: Decomposition) -> Decomposition:
    return replace(
        parts,
        **{
            f.name: getattr(parts, f.name).cpu()
            for f in fields(parts)
            if isinstance(getattr(parts, f.name), torch.Tensor)
        },
    )


def _signature(params) -> tuple:
    """Identity and version of tensors: changes when a parameter is replaced or edited in place."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params if p is not None)


def _capture(
    tower: Tower, images: torch.Tensor, readers: list["_LayerReader"]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run the tower once; keep (fp32) the pieces at the tokens the readout reads, and its features.

    ``embed``, ``attn{l}``, ``mlp{l}``: [B, Q, W] what the embedding, attention layer ``l`` and MLP ``l``
    put into the residual stream at the read tokens (the CLS token, or every token for attention
    pools); ``final``: the final LayerNorm's input. The readers see each block's attention input.
    """
    rows = slice(0, 1) if tower.has_cls else slice(None)
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):  # a copy of the read rows, so the block's whole output [B, N, W] can be freed
        return lambda module, args, out: captured.__setitem__(name, out[:, rows].float().contiguous())

    hooks = [
        tower.embed.register_forward_hook(keep("embed")),
        tower.final_norm.register_forward_hook(
            lambda m, args, out: captured.__setitem__("final", args[0].float())
        ),
    ]
    for i, (block, reader) in enumerate(zip(tower.blocks, readers)):
        hooks += [
            block.attn_write.register_forward_hook(keep(f"attn{i}")),
            block.mlp_write.register_forward_hook(keep(f"mlp{i}")),
            *reader.hooks(),
        ]
    try:
        features = tower.features(images).float()
    finally:
        for hook in hooks:
            hook.remove()
    return captured, features


@dataclass
class _Readout:
    """The readout of one batch, frozen: what it makes of any residual-stream piece (all fp32).

    A piece with vectors ``c_q`` [W] at the read tokens ``q`` and share ``s`` becomes

        finish(X, s),   X[p] = sum_q omega[p, q] c_q @ v_in[p]              (one row per readout head p)
        finish(X, s) = (sum_p (X[p] - s * omega_mu[p] * g[p] + s * beta_v[p]) @ out[p] + s * kappa) / norm

    CLS readout: one head, ``omega = 1/sigma`` (the CLS token's), ``v_in = gamma * proj``, no ``out``.
    Attention pool: ``omega[p, i] = a^p_i / sigma_i``, ``v_in[p] = gamma * W_V^p``, ``out[p] = W_O^p`` (per
    image when the pool MLP is linearised), ``kappa`` the pool's constant. ``g = 1 @ v_in`` and
    ``beta_v = beta @ W_V^p`` (``beta @ proj``) carry the frozen LayerNorm's mean and bias.
    """

    omega: torch.Tensor  # [B, P, Q]
    v_in: torch.Tensor  # [P, W, Dv]
    g: torch.Tensor  # [P, Dv]
    beta_v: torch.Tensor  # [P, Dv]
    omega_mu: torch.Tensor  # [B, P]
    norm: torch.Tensor  # [B]
    signature: tuple  # what v_in depends on (for the per-block output-map cache)
    out: torch.Tensor | None = None  # [P, Dv, d'] or [B, P, Dv, d']
    kappa: torch.Tensor | None = None  # [B, d'] per unit of share
    pool_mlp: torch.Tensor | None = None  # [B, d'] normalised ("direct" convention)
    pool_heads: torch.Tensor | None = None  # [B, P, d'] or [B, N, P, d'] (zero token-0 slot), normalised

    @property
    def omega_sum(self) -> torch.Tensor:
        return self.omega.sum(-1)

    def read(self, pieces: torch.Tensor) -> torch.Tensor:
        """[B, Q, W] vectors at the read tokens -> X [B, P, Dv]."""
        return torch.einsum("bpw,pwe->bpe", self.omega @ pieces, self.v_in)

    def finish(self, x: torch.Tensor, share: float) -> torch.Tensor:
        """X [B, ..., P, Dv] with share ``share`` -> normalised terms [B, ..., d'] (see the class doc)."""

        def batch_view(t: torch.Tensor) -> torch.Tensor:  # [B, rest] -> [B, 1, ..., 1, rest]
            return t.view(t.shape[0], *([1] * (x.ndim - 3)), *t.shape[1:])

        y = x - share * batch_view(self.omega_mu)[..., None] * self.g + share * self.beta_v
        if self.out is None:
            y = y[..., 0, :]
        elif self.out.ndim == 3:
            y = torch.einsum("...pe,pef->...f", y, self.out)
        else:
            y = torch.einsum("b...pe,bpef->b...f", y, self.out)
        if self.kappa is not None:
            y = y + share * batch_view(self.kappa)
        return y / self.norm.view(-1, *([1] * (y.ndim - 1)))


def _norm_stats(norm: nn.LayerNorm, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(mu, sigma, gamma, beta) of a LayerNorm applied to ``x`` [..., W], in fp32."""
    width = norm.normalized_shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    gamma = norm.weight.to(**f32) if norm.weight is not None else torch.ones(width, **f32)
    beta = norm.bias.to(**f32) if norm.bias is not None else torch.zeros(width, **f32)
    return x.mean(-1), torch.sqrt(x.var(-1, unbiased=False) + norm.eps), gamma, beta


def _cls_readout(tower: Tower, final: torch.Tensor, features: torch.Tensor) -> _Readout:
    resid = final[:, 0] if final.ndim == 3 else final  # towers that normalise every token before pooling
    mu, sigma, gamma, beta = _norm_stats(tower.final_norm, resid)
    proj = tower.proj.to(dtype=torch.float32, device=resid.device)
    return _Readout(
        omega=(1 / sigma)[:, None, None],
        v_in=(gamma[:, None] * proj)[None],
        g=(gamma @ proj)[None],
        beta_v=(beta @ proj)[None],
        omega_mu=(mu / sigma)[:, None],
        norm=features.norm(dim=-1),
        signature=_signature([*tower.final_norm.parameters(), tower.proj]),
    )


def _map_readout(
    tower: Tower, final: torch.Tensor, features: torch.Tensor, pool_mlp: PoolMLP, spatial: bool
) -> _Readout:
    pool = tower.pool
    mu, sigma, gamma, beta = _norm_stats(tower.final_norm, final)  # [B, K] statistics per token
    u = gamma * (final - mu[..., None]) / sigma[..., None] + beta  # the pool's input [B, K, W]
    w = _fp32(pool.weights())
    query = w.split(pool.probe().float() @ w.q.T + w.q_bias)  # [P, Dh]: the same for every image
    folded = torch.einsum(
        "pd,pdw->pw", query, w.k.view(w.n_heads, w.head_dim, -1)
    )  # b_K cancels in the softmax
    a = (u @ folded.T * w.scale).softmax(1).transpose(1, 2)  # [B, P, K] pool attention, rows sum to 1
    values = w.split(u @ w.v.T)  # [B, K, P, Dh] (value bias: in c_0)
    w_v = w.split(w.v.T).permute(1, 0, 2)  # [P, W, Dh]
    out = w.split(w.out).permute(1, 2, 0)  # [P, Dh, d']
    c_0 = w.v_bias @ w.out.T + w.out_bias  # what the biases add (sum_i a_i = 1)
    o = torch.einsum("bpk,bkpe,pef->bf", a, values, out) + c_0  # the pool attention's output
    kappa = c_0.expand_as(o)
    if pool_mlp == "linearised":
        out, kappa = _linearised(pool, o, out, kappa)
    omega, norm = a / sigma[:, None], features.norm(dim=-1)
    # the readout's own split: a^p_i u_i W_V^p W_O^p per pool head (and token, when spatial), c_0 shared
    if spatial:
        pool_heads = torch.einsum(
            "bpk,bkpe,pef->bkpf" if out.ndim == 3 else "bpk,bkpe,bpef->bkpf", a, values, out
        )
        pool_heads = F.pad(pool_heads + kappa[:, None, None] / (a.shape[1] * a.shape[2]), (0, 0, 0, 0, 1, 0))
    else:
        reached = torch.einsum("bpk,bkpe->bpe", a, values)
        pool_heads = torch.einsum("bpe,pef->bpf" if out.ndim == 3 else "bpe,bpef->bpf", reached, out)
        pool_heads = pool_heads + kappa[:, None] / a.shape[1]
    return _Readout(
        omega=omega,
        v_in=gamma[None, :, None] * w_v,
        g=torch.einsum("w,pwe->pe", gamma, w_v),
        beta_v=torch.einsum("w,pwe->pe", beta, w_v),
        omega_mu=(omega * mu[:, None]).sum(-1),
        norm=norm,
        signature=_signature([*tower.final_norm.parameters(), *pool.module.parameters()]),
        out=out,
        kappa=kappa,
        pool_heads=pool_heads / norm.view(-1, *[1] * (pool_heads.ndim - 1)),
        pool_mlp=pool.mlp(o) / norm[:, None] if pool_mlp == "direct" else None,
    )


def _fp32(weights: AttentionWeights) -> AttentionWeights:
    return replace(
        weights,
        **{
            f.name: getattr(weights, f.name).float()
            for f in fields(weights)
            if isinstance(getattr(weights, f.name), torch.Tensor)
        },
    )


def _linearised(
    pool: Pool, o: torch.Tensor, out: torch.Tensor, kappa: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the pool MLP with frozen gates into the pool's output map: ``m = J o + m_0`` (row vectors).

    ``J v = ((v - mean(v)) * gamma_p / sigma_o) @ W_1^T * g @ W_2^T`` and
    ``m_0 = (g * (beta_p @ W_1^T + b_1)) @ W_2^T + b_2``, with ``g = act(h) / h`` from the activation's
    own formula (not its derivative). Returns the per-image output map ``out + J out`` [B, P, Dh, d']
    and constant ``kappa + J kappa + m_0`` [B, d'].
    """
    gate = _gate(pool.act)
    mu, sigma, gamma, beta = _norm_stats(pool.norm, o)
    w_1, w_2 = pool.fc1.weight.to(o), pool.fc2.weight.to(o)
    b_1 = pool.fc1.bias.to(o) if pool.fc1.bias is not None else torch.zeros(w_1.shape[0]).to(o)
    b_2 = pool.fc2.bias.to(o) if pool.fc2.bias is not None else torch.zeros(w_2.shape[0]).to(o)
    hidden = (gamma * (o - mu[:, None]) / sigma[:, None] + beta) @ w_1.T + b_1
    g = gate(hidden)  # [B, M]

    def apply_j(v: torch.Tensor) -> torch.Tensor:  # J v for rows v [B, ..., W]: centre, scale, W_1, gate, W_2
        scaled = (v - v.mean(-1, keepdim=True)) * gamma
        mid = (scaled @ w_1.T) * (g / sigma[:, None]).view(g.shape[0], *([1] * (v.ndim - 2)), -1)
        return mid @ w_2.T

    shared = out.expand(o.shape[0], *out.shape)  # [B, P, Dh, d']
    m_0 = (g * (beta @ w_1.T + b_1)) @ w_2.T + b_2
    return shared + apply_j(shared), kappa + apply_j(kappa) + m_0


_GATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "erf GELU": lambda h: 0.5 * (1 + torch.erf(h / math.sqrt(2))),
    "tanh GELU": lambda h: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
    "QuickGELU": lambda h: torch.sigmoid(1.702 * h),
}


def _gate(act: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gate ``g`` with ``act(h) = h * g(h)`` of a GELU-family activation, recognised by its values."""
    probe = torch.linspace(-6, 6, 121)
    for gate in _GATES.values():
        if torch.allclose(act(probe), probe * gate(probe), atol=1e-6, rtol=1e-5):
            return gate
    raise NotImplementedError(
        f"pool_mlp='linearised' needs a GELU-family activation ({', '.join(_GATES)}); this "
        f"pool's MLP uses {act}. Use pool_mlp='direct'."
    )


_OUTPUT_MAPS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _output_maps(
    block: Block, weights: AttentionWeights, readout: _Readout
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out_map`` [H, Dh, P, Dv] and ``bias_raw`` [P, Dv] of a block, cached until the weights change.

    ``out_map[h, :, p] = (W_O^h)^T * layer_scale @ v_in[p]`` maps head ``h``'s value to readout head ``p``;
    it costs as much as a good part of a forward pass on large models, so it is computed once per model.
    """
    key = _signature(list(block.module.parameters())) + readout.signature
    cached = _OUTPUT_MAPS.get(block.module)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    f32 = dict(dtype=torch.float32, device=readout.v_in.device)
    layer_scale = weights.layer_scale.to(**f32)
    per_head = (weights.out.to(**f32).T * layer_scale).unflatten(0, (weights.n_heads, weights.head_dim))
    out_map = torch.einsum("hdw,pwe->hdpe", per_head, readout.v_in)
    bias_raw = torch.einsum("w,pwe->pe", weights.out_bias.to(**f32) * layer_scale, readout.v_in)
    _OUTPUT_MAPS[block.module] = (key, out_map, bias_raw)
    return out_map, bias_raw


class _LayerReader:
    """What the readout needs of one block's attention, read during the forward pass (fp32).

    CLS readouts read one query (the CLS token): its attention row is recomputed from the attention
    input by folding the query into the key weights. Attention pools read every query: the heads'
    outputs before the out-projection are hooked where the backend has a module there, and spatial
    detail recomputes the attention probabilities in full.
    """

    def __init__(self, block: Block, cls: bool, detail: bool, spatial: bool):
        self.block, self.cls, self.detail, self.spatial = block, cls, detail, spatial
        self.weights = _fp32(block.weights())
        self.hook_mixed = detail and not spatial and not cls and block.mixed_input is not None

    def hooks(self) -> list:
        hooks = []
        if self.cls or (self.detail and not self.hook_mixed):
            hooks.append(
                self.block.attn_input.register_forward_hook(lambda m, args, out: self.on_input(out.float()))
            )
        if self.hook_mixed:
            hooks.append(
                self.block.mixed_input.register_forward_hook(
                    lambda m, args, out: setattr(self, "mixed", self.weights.split(args[0].float()))
                )
            )
        return hooks

    def on_input(self, u: torch.Tensor) -> None:
        """``u`` [B, N, W]: keep attention rows [B, H, Q, N], values [B, N, H, Dh], mixed [B, Q, H, Dh]."""
        w = self.weights
        if not self.cls:
            q, k = (w.split(u @ m.T + b).transpose(1, 2) for m, b in ((w.q, w.q_bias), (w.k, w.k_bias)))
            self.probs = (q @ k.transpose(-1, -2) * w.scale).softmax(-1)  # [B, H, K, K]
            self.values = w.split(u @ w.v.T + w.v_bias)  # [B, K, H, Dh]
            if not self.spatial:
                self.mixed = torch.einsum("bhqn,bnhd->bqhd", self.probs, self.values)
            return
        query = w.split(u[:, 0] @ w.q.T + w.q_bias)  # [B, H, Dh]
        # q . (W_K u_i + b_K) = (W_K^T q) . u_i + const: fold the query into the key weights instead of
        # computing every key (O(N W H) instead of O(N W^2)); the constant cancels in the softmax.
        folded = torch.einsum("bhd,hdw->bhw", query, w.k.view(w.n_heads, w.head_dim, -1))
        alpha = torch.einsum("bhw,bnw->bhn", folded, u).mul(w.scale).softmax(-1)  # [B, H, N]
        self.probs = alpha[:, :, None]
        self.cls_value = alpha[..., 0, None] * w.split(u[:, 0] @ w.v.T + w.v_bias)  # alpha_00 v_0 [B, H, Dh]
        if self.detail and self.spatial:
            self.values = w.split(u @ w.v.T + w.v_bias)  # [B, N, H, Dh]
        elif self.detail:
            mixed = torch.einsum("bhn,bnw->bhw", alpha, u)  # attention-weighted inputs
            values = torch.einsum("bhw,hdw->bhd", mixed, w.v.view(w.n_heads, w.head_dim, -1))
            self.mixed = (values + w.v_bias.view(w.n_heads, w.head_dim))[
                :, None
            ]  # sum(alpha) = 1 carries b_V

    def head_terms(self, readout: _Readout, share: float) -> torch.Tensor:
        """Normalised per-head terms [B, H, d'], or per (source token, head) [B, N, H, d'] when spatial."""
        out_map, bias_raw = _output_maps(self.block, self.weights, readout)
        n_heads = self.weights.n_heads
        if not self.spatial:
            reached = torch.einsum(
                "bpq,bqhd->bphd", readout.omega, self.mixed
            )  # what the readout reads, per head
            x = torch.einsum("bphd,hdpe->bhpe", reached, out_map)
            return readout.finish(
                x + readout.omega_sum[:, None, :, None] * bias_raw / n_heads, share / n_heads
            )
        n_tokens = self.values.shape[1]
        weight = torch.einsum("bpq,bhqn->bnhp", readout.omega, self.probs)  # readout weight of each source
        x = torch.einsum("bnhd,hdpe->bnhpe", self.values, out_map) * weight[..., None]
        bias = readout.omega_sum[:, None, None, :, None] * bias_raw / (n_tokens * n_heads)
        return readout.finish(x + bias, share / (n_tokens * n_heads))

    def write_patch_terms(self, readout: _Readout, share: float, out: torch.Tensor) -> None:
        """Write the spatial :meth:`head_terms` [B, N, H, d'] into ``out`` without result-sized temporaries.

        For a CLS readout a term is ``alpha_i / (sigma ||y||) * v_i W_O^h (gamma * proj) + c``: the
        per-image scale is folded into the values ([B, N, H, Dh], small), each head's values are
        multiplied by its output map into ``out``, and the part ``c`` that is the same for every token
        and head (output bias share, frozen mean, beta) is added in place. Attention pools weigh each
        source once per pool head, so they compute :meth:`head_terms` and copy it.
        """
        if readout.out is not None:
            out.copy_(self.head_terms(readout, share))
            return
        out_map, bias_raw = _output_maps(self.block, self.weights, readout)  # [H, Dh, 1, d'], [1, d']
        n_tokens, n_heads = self.values.shape[1], self.weights.n_heads
        per_image = readout.omega[:, 0, 0] / readout.norm  # 1 / (sigma ||y||)
        scale = self.probs[:, :, 0].transpose(1, 2) * per_image[:, None, None]  # [B, N, H]
        scaled = self.values * scale[..., None]  # [B, N, H, Dh]
        for h in range(n_heads):  # a [B, N, d'] temporary per head, not per layer
            out[:, :, h] = scaled[:, :, h] @ out_map[h, :, 0]
        piece_share = share / (n_tokens * n_heads)
        constant = (
            readout.omega_sum[:, :1] * bias_raw / (n_tokens * n_heads)
            - piece_share * (readout.omega_mu[:, :1] * readout.g - readout.beta_v)
        ) / readout.norm[:, None]  # [B, d']
        out += constant[:, None, None]

    def cls_term(self, readout: _Readout, share: float) -> torch.Tensor:
        """[B, H, d'] the CLS-to-CLS part of each head (token 0 of the spatial decomposition)."""
        out_map, bias_raw = _output_maps(self.block, self.weights, readout)
        n_tokens, n_heads = self.probs.shape[-1], self.weights.n_heads
        x = torch.einsum("bhd,hdpe->bhpe", self.cls_value, out_map) * readout.omega[:, None, :, 0, None]
        bias = readout.omega_sum[:, None, :, None] * bias_raw / (n_tokens * n_heads)
        return readout.finish(x + bias, share / (n_tokens * n_heads))
