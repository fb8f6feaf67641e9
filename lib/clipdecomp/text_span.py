"""TEXT SPAN (paper Sec. 4, Algorithm 1): describe one attention head by a few texts from a pool.

For one head, ``C`` holds its direct contributions over ``K`` images ([K, d']) and ``T`` the
L2-normalised embeddings of ``M`` candidate texts ([M, d']). Greedily, ``m`` times: pick the text
along which the head's outputs vary most, record it, and remove its direction from the outputs and
from every remaining text. The chosen texts name what the head writes; their span reconstructs it.

The authors' procedure, step by step (:func:`text_span_reference` is that loop, written out):

1. SVD of the *uncentred* ``C``; project every text onto the top ``r`` right singular vectors
   (no renormalisation afterwards: a text mostly outside the head's output space becomes short).
2. Centre ``C``; the reconstruction starts at the mean row.
3. ``m`` times: score each text ``t`` by the unbiased standard deviation over images of ``C @ t``;
   take the first maximum ``t*``; add the projection of ``C`` on ``u = t*/|t*|`` to the
   reconstruction; deflate ``C <- C - (C u) u^T`` and every text ``t <- t - (t . u) u`` (``t*``
   becomes zero, the chosen directions stay orthonormal).

:func:`text_span` computes the same picks without touching the ``K`` images inside the loop. Texts
live in the span of the ``r`` singular vectors ``V`` [r, d'], so with coordinates ``a = V t`` and the
head's centred covariance in that basis ``S = V Cov(C) V^T`` [r, r], the score is
``std(C @ t) = sqrt(a^T S a)`` and deflation is a rank-one update of the ``[M, r]`` coordinates.
Per step the cost is ``O(M r)``, independent of ``K``; the reconstruction is formed at the end.

Precision: both functions compute in float64 whatever the input dtype, and agree pick for pick
there (up to exact ties broken by rounding). The right singular vectors come from an SVD (QR of
``C``, then SVD of its ``R`` factor), never from the Gram matrix ``C^T C``, whose squared condition
number would blur the trailing singular directions. Those matter: a real head's outputs have rank at
most ``head_dim + 3`` (W_O's range, the output bias, and the frozen LayerNorm's mean and shift
directions: 67 for ViT-L-14), below ``r = 80``, so the last basis vectors are set by rounding noise,
and later picks depend on them through the deflation -- in the authors' code too.
Picks are fully determined by the data only when ``C`` has rank at least ``r``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .decomposition import Decomposition
from .progress import progress_bar

__all__ = [
    "TextSpanResult",
    "describe_heads",
    "reconstruct_heads",
    "reconstruction_curve",
    "text_span",
    "text_span_heads",
    "text_span_reference",
]

STOP_RTOL = 1e-9
"""A step stops the search when the best score is below ``STOP_RTOL`` times the first step's score:
the remaining texts are (numerically) orthogonal to everything the head does."""


@dataclass
class TextSpanResult:
    """The texts TEXT SPAN chose for one head, and how much of the head they explain.

    Attributes:
        indices: [m] long, chosen rows of the text pool, in the order they were picked.
        scores: [m] the quantity each step maximised: the unbiased std over images of ``C @ t*`` for
            the deflated, *unnormalised* text ``t*`` (short texts score low).
        variance: [m] unbiased variance over images of the head's outputs along the unit direction
            ``u_k`` of pick ``k`` (equals ``scores**2 / |t*|**2``).
        explained: [m] per step, ``variance / total_variance``: the fraction of the head's total
            variance that pick ``k`` adds. The directions are orthonormal, so
            ``cumulative_explained[k]`` is the fraction explained by the span of picks ``0..k``.
        total_variance: sum over the d' coordinates of the unbiased variance of ``C`` (all of it,
            also the part outside the top-``r`` singular directions).
        directions: [m, d'] float64, the orthonormal unit directions ``u_k`` (chosen texts after
            projection and deflation).
        mean: [d'] float64, the mean head output.
        rank: the number of singular vectors used, ``min(r, K, d')``.
        reconstruction: [K, d'] ``mean + (C - mean) @ directions.T @ directions`` in the input's
            dtype, or ``None`` when not requested (see :meth:`project`).
    """

    indices: torch.Tensor
    scores: torch.Tensor
    variance: torch.Tensor
    explained: torch.Tensor
    total_variance: float
    directions: torch.Tensor
    mean: torch.Tensor
    rank: int
    reconstruction: torch.Tensor | None = None

    @property
    def cumulative_explained(self) -> torch.Tensor:
        """[m] fraction of the total variance explained by the first ``k + 1`` picks."""
        return self.explained.cumsum(0)

    def texts(self, pool: Sequence[str]) -> list[str]:
        """The chosen texts, in order, from the pool whose embeddings were searched."""
        return [pool[i] for i in self.indices.tolist()]

    def project(self, head_outputs: torch.Tensor, m: int | None = None) -> torch.Tensor:
        """Replace ``head_outputs`` [n, d'] by the mean plus their projection on the first ``m`` picks.

        With the images TEXT SPAN was run on, this is ``reconstruction``; it also applies to other
        images of the same head (e.g. a held-out split), and ``m`` gives the curve "accuracy vs m".
        """
        basis = self.directions[: len(self.indices) if m is None else m].to(head_outputs.device)
        mean = self.mean.to(head_outputs.device)
        centred = head_outputs.to(torch.float64) - mean
        return (mean + (centred @ basis.T) @ basis).to(head_outputs.dtype)


def _exhausted(step: int, m: int, score: float, scores: list[float], stacklevel: int) -> bool:
    """The stopping rule both loops share: error on a constant head, stop (with a warning) once the
    best remaining text scores below ``STOP_RTOL`` times the first pick's score."""
    if step == 0 and score == 0:
        raise ValueError(
            "The head's outputs do not vary along any text of the pool (zero variance): "
            "are all images identical, or is the head constant?"
        )
    if step > 0 and score <= STOP_RTOL * scores[0]:
        warnings.warn(
            f"TEXT SPAN stopped after {step} of {m} picks: the remaining texts are orthogonal "
            "to the head's variation (the pool spans too few directions).",
            stacklevel=stacklevel,
        )
        return True
    return False


def _check_inputs(head_outputs: torch.Tensor, texts: torch.Tensor, m: int, rank: int) -> None:
    if not isinstance(head_outputs, torch.Tensor) or head_outputs.ndim != 2:
        raise ValueError(
            "head_outputs must be a [K images, d'] tensor (one head); "
            f"got {getattr(head_outputs, 'shape', type(head_outputs))}. "
            "For many heads use text_span_heads."
        )
    if head_outputs.shape[0] < 2:
        raise ValueError(
            f"TEXT SPAN needs at least 2 images (a variance over images); got {head_outputs.shape[0]}."
        )
    if head_outputs.shape[1] != texts.shape[1]:
        raise ValueError(
            f"head_outputs have d'={head_outputs.shape[1]} but the text embeddings have "
            f"d'={texts.shape[1]}: embed the pool with the same CLIP model."
        )
    if not torch.isfinite(head_outputs).all():
        raise ValueError("head_outputs contain NaN or Inf; check the decomposition (fp16 overflow?).")
    if rank < 1 or m < 1:
        raise ValueError(f"m and rank must be positive integers; got m={m}, rank={rank}.")
    if m > texts.shape[0]:
        raise ValueError(
            f"m={m} texts requested from a pool of {texts.shape[0]}: use a larger pool or a smaller m."
        )
    usable = min(rank, *head_outputs.shape)
    if m > usable:
        raise ValueError(
            f"m={m} exceeds the rank used, min(rank={rank}, K={head_outputs.shape[0]}, "
            f"d'={head_outputs.shape[1]}) = {usable}: after that many picks every text is "
            "deflated to zero. Use a smaller m (or a larger rank, if K and d' allow)."
        )


def _prepare_texts(text_embeddings: torch.Tensor) -> torch.Tensor:
    """Validate the pool and L2-normalise it in float64; warn about duplicate rows."""
    if not isinstance(text_embeddings, torch.Tensor) or text_embeddings.ndim != 2:
        raise ValueError(
            "text_embeddings must be a [M texts, d'] tensor; "
            f"got {getattr(text_embeddings, 'shape', type(text_embeddings))}."
        )
    if text_embeddings.shape[0] == 0:
        raise ValueError("The text pool is empty: embed at least m texts (see clipdecomp.pools.load_pool).")
    texts = text_embeddings.detach().to("cpu", torch.float64)
    if not torch.isfinite(texts).all():
        raise ValueError("text_embeddings contain NaN or Inf.")
    norms = texts.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        rows = torch.nonzero(norms[:, 0] == 0).flatten()[:5].tolist()
        raise ValueError(
            f"text_embeddings rows {rows} are all zero and have no direction; drop them from the pool."
        )
    texts = texts / norms
    n_unique = torch.unique(texts, dim=0).shape[0]
    if n_unique < texts.shape[0]:
        warnings.warn(
            f"The text pool has {texts.shape[0] - n_unique} duplicate embedding rows. TEXT SPAN "
            "still works (the first copy wins ties, the others are deflated to zero once it is "
            "picked), but deduplicate the pool to keep scores readable.",
            stacklevel=3,
        )
    return texts


def _head_basis(c: torch.Tensor, rank: int) -> torch.Tensor:
    """[r, d'] top right singular vectors of the uncentred float64 ``c`` [K, d'] (QR, then SVD of R)."""
    r_factor = torch.linalg.qr(c, mode="r").R
    _, _, vh = torch.linalg.svd(r_factor, full_matrices=False)
    return vh[:rank]


def _span_one(
    c: torch.Tensor, texts: torch.Tensor, m: int, rank: int, reconstruct: bool, out_dtype: torch.dtype
) -> TextSpanResult:
    """The fast loop for one head; ``c`` [K, d'] and ``texts`` [M, d'] unit rows, both float64 on CPU."""
    k = c.shape[0]
    basis = _head_basis(c, rank)  # V [r, d']
    mean = c.mean(0)
    centred = c - mean
    x = centred @ basis.T  # [K, r] coordinates of the centred outputs
    cov = x.T @ x / (k - 1)  # S [r, r]
    total_variance = float(centred.pow(2).sum() / (k - 1))
    coords = texts @ basis.T  # A [M, r]; the projected texts are A @ V
    coords_cov = coords @ cov  # B = A S, kept equal to A S under deflation
    picks, scores, variances, units = [], [], [], []
    for step in range(m):
        var = (coords * coords_cov).sum(1)  # a^T S a = unbiased var of C @ t
        best = int(torch.argmax(var))  # the first maximum, as numpy/torch argmax
        score = float(var[best].clamp_min(0).sqrt())
        if _exhausted(step, m, score, scores, stacklevel=4):
            break
        a = coords[best].clone()
        norm2 = a @ a
        weights = coords @ a / norm2  # t . t* / |t*|^2 for every text
        coords -= weights[:, None] * a
        coords_cov -= weights[:, None] * (cov @ a)
        picks.append(best)
        scores.append(score)
        variances.append(score**2 / float(norm2))
        units.append(a / norm2.sqrt())
    directions = torch.stack(units) @ basis  # [m, d'] orthonormal
    variance = torch.tensor(variances, dtype=torch.float64)
    reconstruction = (mean + (centred @ directions.T) @ directions).to(out_dtype) if reconstruct else None
    return TextSpanResult(
        indices=torch.tensor(picks, dtype=torch.long),
        scores=torch.tensor(scores, dtype=torch.float64),
        variance=variance,
        explained=variance / total_variance,
        total_variance=total_variance,
        directions=directions,
        mean=mean,
        rank=basis.shape[0],
        reconstruction=reconstruction,
    )


def text_span(
    head_outputs: torch.Tensor,
    text_embeddings: torch.Tensor,
    m: int = 20,
    rank: int = 80,
    reconstruct: bool = True,
) -> TextSpanResult:
    """Pick ``m`` texts whose span explains the variance of one head's outputs (fast, float64).

    Args:
        head_outputs: [K images, d'] one head's direct contributions, e.g. ``parts["L22H1"]``.
        text_embeddings: [M, d'] the pool's text embeddings (normalised here again; duplicates warn).
        m: number of texts to pick; at most ``min(M, rank, K, d')``.
        rank: ``r``, how many right singular vectors of the uncentred outputs the texts are projected on.
        reconstruct: also return ``reconstruction`` [K, d'] (in the dtype of ``head_outputs``).

    Returns the same picks as :func:`text_span_reference` (see the module docstring for the method
    and its precision). If the pool runs out of directions the head uses before ``m`` picks, it warns
    and returns fewer.

    >>> from clipdecomp.pools import load_pool
    >>> pool = load_pool("toy")
    >>> result = text_span(parts["L5H2"], bundle.encode_text(pool), m=3)   # parts: a toy decomposition
    >>> len(result.texts(pool)), bool(result.cumulative_explained[-1] <= 1)
    (3, True)
    """
    texts = _prepare_texts(text_embeddings)
    _check_inputs(head_outputs, texts, m, rank)
    c = head_outputs.detach().to("cpu", torch.float64)
    return _span_one(c, texts, m, rank, reconstruct, head_outputs.dtype)


def text_span_heads(
    head_outputs: torch.Tensor | Mapping[str, torch.Tensor] | Decomposition,
    text_embeddings: torch.Tensor,
    m: int = 20,
    rank: int = 80,
    layers: Sequence[int] | None = None,
    reconstruct: bool = False,
    progress: bool = False,
) -> dict[str, TextSpanResult]:
    """Run :func:`text_span` on many heads; returns ``{"L22H1": result, ...}``.

    ``head_outputs`` is a :class:`Decomposition` (its per-head terms; labels from ``head_layers``),
    a dict ``label -> [K, d']``, or a tensor [K, L, H, d'] whose layers are named by ``layers``
    (default ``0..L-1``). The pool is validated and normalised once. Reconstructions are off by
    default (K x heads x d' floats); use ``result.project(outputs)`` for the heads you need.
    """
    if isinstance(head_outputs, Decomposition):
        layers, head_outputs = head_outputs.head_layers, head_outputs.head_terms()
    if isinstance(head_outputs, torch.Tensor):
        if head_outputs.ndim != 4:
            raise ValueError(
                f"A tensor of head outputs must be [K, L, H, d']; got shape {tuple(head_outputs.shape)}."
            )
        layers = list(range(head_outputs.shape[1])) if layers is None else list(layers)
        if len(layers) != head_outputs.shape[1]:
            raise ValueError(f"{len(layers)} layer names for {head_outputs.shape[1]} layers of head outputs.")
        heads = {
            f"L{layer}H{h}": head_outputs[:, i, h]
            for i, layer in enumerate(layers)
            for h in range(head_outputs.shape[2])
        }
    elif isinstance(head_outputs, Mapping):
        heads = dict(head_outputs)
    else:
        raise TypeError(
            "head_outputs must be a Decomposition, a dict or a [K, L, H, d'] tensor; "
            f"got {type(head_outputs)}."
        )
    texts = _prepare_texts(text_embeddings)
    items = progress_bar(heads.items(), show=progress, desc="TEXT SPAN", total=len(heads))
    results = {}
    for label, outputs in items:
        _check_inputs(outputs, texts, m, rank)
        c = outputs.detach().to("cpu", torch.float64)
        results[label] = _span_one(c, texts, m, rank, reconstruct, outputs.dtype)
    return results


def text_span_reference(
    head_outputs: torch.Tensor, text_embeddings: torch.Tensor, m: int = 20, rank: int = 80
) -> TextSpanResult:
    """The authors' loop, literally: every step scores all texts against all ``K`` images in d' space.

    Slow (``O(K d' M)`` per step) and kept as the oracle for :func:`text_span` in tests and
    ``bench/bench_text_span.py``. Float64 throughout; same stopping rule and result fields.
    """
    texts = _prepare_texts(text_embeddings)
    _check_inputs(head_outputs, texts, m, rank)
    c = head_outputs.detach().to("cpu", torch.float64)
    _, _, vh = torch.linalg.svd(c, full_matrices=False)
    vh = vh[:rank]
    texts = texts @ vh.T @ vh  # projected on the top-r right singular vectors
    mean = c.mean(0, keepdim=True)
    data = c - mean
    total_variance = float(data.var(0).sum())
    reconstruction = mean.repeat(c.shape[0], 1)
    picks, scores, variances, units = [], [], [], []
    for step in range(m):
        stds = (data @ texts.T).std(0)  # unbiased, over images
        best = int(torch.argmax(stds))
        score = float(stds[best])
        if _exhausted(step, m, score, scores, stacklevel=3):
            break
        chosen = texts[best].clone()
        norm2 = chosen @ chosen
        along = data @ chosen / norm2  # [K] coefficients of the projection on t*
        reconstruction += along[:, None] * chosen
        data = data - along[:, None] * chosen
        texts = texts - (texts @ chosen / norm2)[:, None] * chosen
        unit = chosen / norm2.sqrt()
        picks.append(best)
        scores.append(score)
        variances.append(float((along * norm2.sqrt()).var()))
        units.append(unit)
    variance = torch.tensor(variances, dtype=torch.float64)
    return TextSpanResult(
        indices=torch.tensor(picks, dtype=torch.long),
        scores=torch.tensor(scores, dtype=torch.float64),
        variance=variance,
        explained=variance / total_variance,
        total_variance=total_variance,
        directions=torch.stack(units),
        mean=mean[0],
        rank=vh.shape[0],
        reconstruction=reconstruction.to(head_outputs.dtype),
    )


def _outside_heads(parts: Decomposition, means: Decomposition) -> torch.Tensor:
    """[B, d'] embedding term and MLPs of ``parts`` plus the means of the attention layers without
    head detail."""
    embedding = parts.embedding + parts.mlps.sum(1)
    for layer in range(parts.n_layers):
        if layer not in parts.head_layers:
            embedding = embedding + means.attns[:, layer].mean(0).to(embedding)
    return embedding


def reconstruct_heads(
    parts: Decomposition, spans: Mapping[str, TextSpanResult], m: int, means: Decomposition
) -> torch.Tensor:
    """[B, d'] embeddings with every head replaced by its TEXT SPAN reconstruction from ``m`` texts.

    The paper's test of a description: every head of ``parts.head_layers`` becomes its mean plus its
    projection on the span of its first ``m`` texts (``m = 0``: its mean alone), every other
    attention layer is mean-ablated, and the embedding term and MLPs are kept. The means come from
    ``means`` (the images TEXT SPAN was fitted on), so ``parts`` can be a held-out set.
    """
    if m < 0:
        raise ValueError(f"m must be >= 0 texts, got {m}.")
    missing = [
        f"L{layer}H{h}"
        for layer in parts.head_layers
        for h in range(parts.n_heads)
        if f"L{layer}H{h}" not in spans
    ]
    if missing:
        raise KeyError(f"No TEXT SPAN result for {missing[:4]}: run text_span_heads on the same layers.")
    embedding = _outside_heads(parts, means)
    head_terms = parts.head_terms()
    for i, layer in enumerate(parts.head_layers):
        for h in range(parts.n_heads):
            embedding = embedding + spans[f"L{layer}H{h}"].project(head_terms[:, i, h], m=m)
    return embedding


def reconstruction_curve(
    parts: Decomposition,
    means: Decomposition,
    spans_by_pool: Mapping[str, Mapping[str, TextSpanResult]],
    ms: Sequence[int],
    score: Callable[[torch.Tensor], float],
) -> tuple[float, "pd.DataFrame"]:  # noqa: F821
    """Score of the heads intact (other attention layers mean-ablated) and of their reconstructions.

    Returns ``(intact, curve)``: ``curve`` has one row per ``m`` and one column per pool, each entry
    ``score(reconstruct_heads(parts, spans, m, means))`` (e.g. ``EvaluationSet.mean_accuracy``).
    """
    import pandas as pd

    intact = score(_outside_heads(parts, means) + parts.head_terms().sum((1, 2)))
    curve = pd.DataFrame(
        {
            pool: [score(reconstruct_heads(parts, spans, m, means)) for m in ms]
            for pool, spans in spans_by_pool.items()
        },
        index=pd.Index(list(ms), name="m"),
    )
    return intact, curve


def describe_heads(
    spans: Mapping[str, TextSpanResult], pool: Sequence[str], first: int = 5
) -> "pd.DataFrame":  # noqa: F821
    """One row per head: its first texts and the share of its variance they (and all picks) explain."""
    import pandas as pd

    rows = {}
    for label, span in spans.items():
        explained = span.cumulative_explained
        rows[label] = {
            f"first {first} texts": " | ".join(span.texts(pool)[:first]),
            f"explained by {first}": f"{explained[min(first, len(explained)) - 1].item():.0%}",
            "explained by all": f"{explained[-1].item():.0%} ({len(explained)} texts)",
        }
    return pd.DataFrame(rows).T
