"""Property-specific retrieval: nearest neighbours under one head's direct contribution.

Two images are similar *for head (l, h)* when that head writes similar vectors for them: the
similarity is the dot product of their head terms. A colour head retrieves same-colour images, a
shape head same-shape ones; the full embedding mixes every property.
"""
from __future__ import annotations

import torch

__all__ = ["similarities", "nearest"]


def similarities(terms: torch.Tensor, query: int | torch.Tensor) -> torch.Tensor:
    """[n] dot products between each row of ``terms`` ([n, d']) and the query (a row index or a [d'] vector)."""
    vector = terms[query] if isinstance(query, int) else query
    return terms @ vector.to(terms)


def nearest(terms: torch.Tensor, query: int, k: int = 8, exclude_self: bool = True) -> torch.Tensor:
    """Indices of the ``k`` rows of ``terms`` most similar to row ``query`` (best first)."""
    if not 0 <= query < len(terms):
        raise IndexError(f"query {query} out of range for {len(terms)} images.")
    scores = similarities(terms, query).clone()
    if exclude_self:
        scores[query] = -torch.inf
    return scores.topk(min(k, len(terms) - int(exclude_self))).indices
