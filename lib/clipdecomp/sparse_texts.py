"""Sparse text decompositions: orthogonal matching pursuit (OMP) of many targets over a text pool at once.

The second-order paper describes each neuron's rank-1 direction ``r_n`` as a sparse combination of
text embeddings (Sec. 4): ``r_n ~ sum_j gamma_j t_j`` with at most ``m`` nonzero ``gamma_j``. OMP builds the
support greedily: pick the atom most correlated with the residual, ``argmax_j |<t_j, residual>|``; refit
all picked atoms by least squares; repeat ``m`` times.

:func:`omp` gives the picks and coefficients of scikit-learn's OMP, as used by the authors
(``SparseCoder(transform_algorithm="omp", transform_n_nonzero_coefs=m)``, which calls
``orthogonal_mp_gram``), including its early stops: a target stops when the best correlation is below
machine epsilon (squared), when it would pick an atom twice, or when the new atom is linearly dependent
on the picked ones (Cholesky pivot <= epsilon). The difference is the cost. scikit-learn forms the
``M x M`` Gram matrix of the pool (7.2 GB in float64 for 30,000 texts) and copies it for every target;
here the correlations are recomputed as ``dictionary @ residual`` for a block of targets at once (one
matrix product per step), and only the ``m x m`` Cholesky factor of each target's picked atoms is
kept. Cost: ``O(targets * m * M * d)`` in large matrix products, memory ``O(block * (M + m d))``.

Precision: computations run in the dtype of the inputs (float64 if either is float64). In float64
the picks and coefficients equal scikit-learn's (tests compare them); in float32 a near-tie between
two atoms can be broken differently, since the correlations are rounded differently. Exact ties go
to the lowest atom index (scikit-learn swaps picked atoms to the front, so its tie order can differ
after the first pick).

:func:`text_dictionary` prepares the pool as the authors do (``normalisation="authors"``): embeddings
L2-normalised, centred over the pool, then every *embedding dimension* (column) scaled to norm 100, so
atoms are not unit-norm and OMP's argmax favours long atoms, exactly as in their code.

    >>> from clipdecomp.pools import load_pool
    >>> pool = load_pool("toy")
    >>> dictionary = text_dictionary(bundle.encode_text(pool))
    >>> directions = torch.randn(8, 64)                  # e.g. neurons' rank-1 directions (SecondOrderStats)
    >>> codes = omp(directions, dictionary, n_atoms=4)
    >>> len(codes.texts(pool, 7))   # neuron 7's [(text, coefficient), ...], largest |coefficient| first
    4
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["Normalisation", "SparseCodes", "omp", "text_dictionary"]

Normalisation = Literal["authors", "unit", "none"]


def text_dictionary(embeddings: torch.Tensor, normalisation: Normalisation = "authors") -> torch.Tensor:
    """[M, d'] OMP atoms from text embeddings [M, d'] (rows: texts).

    ``"authors"``: L2-normalise each text, subtract the pool mean, scale each column (embedding
    dimension) to norm 100 (their ``compute_sparse_decomposition.py``). ``"unit"``: L2-normalise each
    text (the textbook OMP dictionary). ``"none"``: use the embeddings as given.
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or len(embeddings) < 2:
        raise ValueError(
            "embeddings must be a [M, d'] tensor of at least two texts (e.g. bundle.encode_text(pool))."
        )
    if normalisation == "none":
        return embeddings
    texts = torch.nn.functional.normalize(embeddings, dim=1)
    if normalisation == "unit":
        return texts
    if normalisation != "authors":
        raise ValueError(f"normalisation must be 'authors', 'unit' or 'none', got {normalisation!r}.")
    centred = 100 * texts - 100 * texts.mean(0, keepdim=True)
    scale = centred.norm(dim=0, keepdim=True)
    if (scale == 0).any():
        raise ValueError(
            "A column of the centred pool is zero (all texts agree on that embedding dimension): the "
            "authors' column normalisation is undefined; use normalisation='unit'."
        )
    return 100 * centred / scale


@dataclass
class SparseCodes:
    """Sparse codes of ``n`` targets over a pool of ``n_pool`` atoms.

    Attributes:
        atoms: long [n, m] picked atom indices in the order OMP picked them; -1 after an early stop.
        coefficients: [n, m] the final least-squares coefficient of each picked atom (0 where unused).
        n_pool: the number of atoms in the dictionary.
    """

    atoms: torch.Tensor
    coefficients: torch.Tensor
    n_pool: int

    def __len__(self) -> int:
        return len(self.atoms)

    @property
    def n_picked(self) -> torch.Tensor:
        """[n] how many atoms each target got (fewer than m after an early stop)."""
        return (self.atoms >= 0).sum(1)

    def dense(self) -> torch.Tensor:
        """[n, n_pool] coefficients (the layout of scikit-learn's ``SparseCoder.transform``)."""
        out = self.coefficients.new_zeros(len(self), self.n_pool)
        used = self.atoms >= 0
        out[torch.nonzero(used, as_tuple=True)[0], self.atoms[used]] = self.coefficients[used]
        return out

    def top(self, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(atoms, coefficients) [n, k] sorted by decreasing |coefficient| (unused slots last)."""
        magnitude = torch.where(self.atoms >= 0, self.coefficients.abs(), -1.0)
        order = magnitude.argsort(dim=1, descending=True, stable=True)[:, :k]
        return self.atoms.gather(1, order), self.coefficients.gather(1, order)

    def reconstruct(self, dictionary: torch.Tensor) -> torch.Tensor:
        """[n, d'] ``sum_j coefficient_j * atom_j`` (the paper's ``r_hat``), with the dictionary OMP used."""
        used = (self.atoms >= 0).to(dictionary.dtype)
        atoms = dictionary[self.atoms.clamp_min(0)]  # [n, m, d']
        return torch.einsum("nm,nmd->nd", self.coefficients.to(dictionary.dtype) * used, atoms)

    def texts(self, pool: Sequence[str], neuron: int, k: int | None = None) -> list[tuple[str, float]]:
        """The texts of target ``neuron`` with their coefficients, by decreasing |coefficient|."""
        atoms, coefficients = self.top(k)
        return [(pool[int(a)], float(c)) for a, c in zip(atoms[neuron], coefficients[neuron]) if a >= 0]

    @staticmethod
    def cat(parts: Sequence[SparseCodes]) -> SparseCodes:
        """Stack the codes of several target sets (same pool, same m) in order."""
        if len({p.n_pool for p in parts}) != 1 or len({p.atoms.shape[1] for p in parts}) != 1:
            raise ValueError("SparseCodes.cat needs codes over the same pool with the same number of atoms.")
        return SparseCodes(
            torch.cat([p.atoms for p in parts]), torch.cat([p.coefficients for p in parts]), parts[0].n_pool
        )


@torch.no_grad()
def omp(targets: torch.Tensor, dictionary: torch.Tensor, n_atoms: int, block: int = 256) -> SparseCodes:
    """Orthogonal matching pursuit of each row of ``targets`` [n, d'] over the rows of ``dictionary`` [M, d'].

    Args:
        targets: the vectors to encode (e.g. the unit-norm rank-1 directions of a layer's neurons).
        dictionary: the atoms, e.g. :func:`text_dictionary` of a text pool; on the device to compute on.
        n_atoms: ``m``, the number of atoms per target (scikit-learn's ``n_nonzero_coefs``).
        block: how many targets are solved together (memory ~ ``block * (M + m d')`` numbers).

    Returns:
        :class:`SparseCodes` equal to scikit-learn's ``SparseCoder(dictionary, transform_algorithm="omp",
        transform_n_nonzero_coefs=m).transform(targets)`` (see the module docstring for ties).
    """
    if not isinstance(targets, torch.Tensor) or targets.ndim != 2:
        raise ValueError("targets must be a [n, d'] tensor (one row per vector to encode).")
    if (
        not isinstance(dictionary, torch.Tensor)
        or dictionary.ndim != 2
        or dictionary.shape[1] != targets.shape[1]
    ):
        raise ValueError(
            f"dictionary must be [M, {targets.shape[1]}] (one atom per row, same width as targets)."
        )
    if isinstance(n_atoms, bool) or not isinstance(n_atoms, int) or not 1 <= n_atoms <= len(dictionary):
        raise ValueError(
            f"n_atoms must be an integer in 1..{len(dictionary)} (the number of atoms), got {n_atoms!r}."
        )
    if not (torch.isfinite(targets).all() and torch.isfinite(dictionary).all()):
        raise ValueError("targets and dictionary must be finite (no NaN or Inf).")
    dtype = torch.promote_types(targets.dtype, dictionary.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    atoms = dictionary.to(dtype)
    squared = (atoms * atoms).sum(1)
    parts = [
        _omp_block(chunk.to(device=atoms.device, dtype=dtype), atoms, squared, n_atoms)
        for chunk in targets.split(block)
    ]
    return SparseCodes.cat(parts)


def _omp_block(y: torch.Tensor, atoms: torch.Tensor, squared: torch.Tensor, m: int) -> SparseCodes:
    """OMP of a block of targets; the Cholesky factor of each target's picked atoms grows a row per step."""
    n, width = y.shape
    eps = torch.finfo(y.dtype).eps
    rows = torch.arange(n, device=y.device)
    correlation = y @ atoms.T  # [n, M]
    alpha = correlation
    picks = torch.full((n, m), -1, dtype=torch.long, device=y.device)
    chosen = y.new_zeros(n, m, width)
    factor = torch.zeros(n, m, m, dtype=y.dtype, device=y.device)
    rhs = y.new_zeros(n, m)
    gamma = y.new_zeros(n, m)
    running = torch.ones(n, dtype=torch.bool, device=y.device)
    for k in range(m):
        best = alpha.abs().argmax(1)
        atom = atoms[best]  # [n, d']
        running &= ~(picks[:, :k] == best[:, None]).any(1) & (alpha[rows, best] ** 2 >= eps)
        if k == 0:
            pivot = squared[best]
        else:
            gram_row = torch.einsum("nkd,nd->nk", chosen[:, :k], atom)
            below = torch.linalg.solve_triangular(factor[:, :k, :k], gram_row[..., None], upper=False)[..., 0]
            pivot = squared[best] - (below * below).sum(1)
            running &= pivot > eps
            factor[:, k, :k] = torch.where(running[:, None], below, 0.0)
        factor[:, k, k] = torch.where(running, pivot.clamp_min(eps).sqrt(), 1.0)
        if not running.any():
            break
        picks[:, k] = torch.where(running, best, -1)
        chosen[:, k] = torch.where(running[:, None], atom, 0.0)
        rhs[:, k] = torch.where(running, correlation[rows, best], 0.0)
        solved = torch.cholesky_solve(rhs[:, : k + 1, None], factor[:, : k + 1, : k + 1])[..., 0]
        gamma[:, : k + 1] = torch.where(running[:, None], solved, gamma[:, : k + 1])
        if k + 1 < m:
            approximation = torch.einsum("nk,nkd->nd", gamma[:, : k + 1], chosen[:, : k + 1])
            alpha = correlation - approximation @ atoms.T
    return SparseCodes(picks, torch.where(picks >= 0, gamma, 0.0), len(atoms))
