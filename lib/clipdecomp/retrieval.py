"""Property-specific retrieval: nearest neighbours under one head's direct contribution.

Two images are similar *for head (l, h)* when that head writes similar vectors for them: the
similarity is the dot product of their head terms. A colour head retrieves same-colour images, a
shape head same-shape ones; the full embedding mixes every property.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["similarities", "nearest", "neighbour_agreement", "agreement_by_head", "chance_agreement"]


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


def neighbour_agreement(terms: torch.Tensor, values: torch.Tensor | np.ndarray, k: int = 8) -> torch.Tensor:
    """[n] for each image, the fraction of its ``k`` nearest neighbours that share its attribute value.

    Neighbours are ranked by the dot product of ``terms`` ([n, d'], e.g. one head's direct terms, as in
    :func:`nearest`); an image is never its own neighbour.
    """
    values = torch.as_tensor(values)
    if len(values) != len(terms):
        raise ValueError(f"{len(terms)} rows of terms but {len(values)} attribute values.")
    if not 1 <= k < len(terms):
        raise ValueError(f"k={k} neighbours needs 1 <= k < n images ({len(terms)}).")
    scores = terms.float() @ terms.float().T
    scores.fill_diagonal_(-torch.inf)
    neighbours = scores.topk(k, dim=1).indices
    return (values[neighbours] == values[:, None]).float().mean(1)


def agreement_by_head(head_terms: torch.Tensor, values: torch.Tensor | np.ndarray, k: int = 8) -> torch.Tensor:
    """[L', H] mean :func:`neighbour_agreement` of each head's terms ([n, L', H, d'])."""
    return torch.tensor([[neighbour_agreement(head_terms[:, layer, head], values, k).mean().item()
                          for head in range(head_terms.shape[2])] for layer in range(head_terms.shape[1])])


def chance_agreement(values: torch.Tensor | np.ndarray) -> float:
    """Expected :func:`neighbour_agreement` of neighbours drawn at random from the other images."""
    _, counts = np.unique(np.asarray(values), return_counts=True)
    n = counts.sum()
    if n < 2:
        raise ValueError(f"chance_agreement needs at least 2 images, got {n}.")
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))
