"""Batched OMP picks exactly what scikit-learn's OMP picks, with the same coefficients and early stops."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clipdecomp.sparse_texts import SparseCodes, omp, text_dictionary
from sklearn.decomposition import SparseCoder

torch.set_num_threads(1)


def pool_like(seed: int, n: int, d: int) -> torch.Tensor:
    """Correlated unit vectors, like CLIP text embeddings (a shared component plus clusters), float64."""
    g = torch.Generator().manual_seed(seed)
    common, clusters = torch.randn(d, generator=g), torch.randn(8, d, generator=g)
    which = torch.randint(0, 8, (n,), generator=g)
    return F.normalize(0.8 * common + clusters[which] + 0.7 * torch.randn(n, d, generator=g), dim=-1).double()


def targets_like(seed: int, pool: torch.Tensor, n: int) -> torch.Tensor:
    """Unit targets that are sparse mixtures of pool texts plus noise (as rank-1 neuron directions)."""
    g = torch.Generator().manual_seed(seed + 100)
    picks = torch.randint(0, len(pool), (n, 5), generator=g)
    mixed = (torch.randn(n, 5, 1, generator=g, dtype=torch.float64) * pool[picks]).sum(1)
    return F.normalize(mixed + 0.1 * torch.randn(n, pool.shape[1], generator=g, dtype=torch.float64), dim=1)


def sklearn_codes(targets: torch.Tensor, dictionary: torch.Tensor, m: int) -> np.ndarray:
    """The authors' call: SparseCoder(dictionary, 'omp', transform_n_nonzero_coefs=m, transform_alpha=1e-4)"""
    coder = SparseCoder(
        dictionary=dictionary.numpy(),
        transform_algorithm="omp",
        transform_n_nonzero_coefs=m,
        transform_alpha=1e-4,
    )
    return coder.transform(targets.numpy())


@pytest.mark.parametrize("normalisation", ["authors", "unit"])
@pytest.mark.parametrize("m", [1, 8, 30])
def test_equal_support_and_coefficients_to_sklearn_on_a_500_atom_pool(normalisation, m):
    pool = pool_like(0, 500, 48)
    dictionary = text_dictionary(pool, normalisation)
    targets = targets_like(0, pool, 40)
    codes = omp(targets, dictionary, m, block=16)  # three blocks, the last one partial
    expected = sklearn_codes(targets, dictionary, m)
    dense = codes.dense().numpy()
    np.testing.assert_array_equal(dense != 0, expected != 0)
    np.testing.assert_allclose(dense, expected, atol=1e-6, rtol=0)
    assert (codes.n_picked == m).all() and ((dense != 0).sum(1) <= m).all()


def test_pick_order_and_a_residual_that_never_grows():
    pool = pool_like(1, 300, 32)
    dictionary = text_dictionary(pool)
    targets = targets_like(1, pool, 12)
    runs = [omp(targets, dictionary, m) for m in range(1, 13)]
    for m in range(1, 12):  # greedy: the first m picks do not change when m grows
        assert runs[m].atoms[:, :m].tolist() == runs[m - 1].atoms.tolist()
    residuals = torch.stack([(targets - codes.reconstruct(dictionary)).norm(dim=1) for codes in runs])
    assert (residuals[1:] <= residuals[:-1] + 1e-12).all()
    assert (residuals[-1] < residuals[0]).all()


def test_dependent_atoms_stop_early_exactly_as_sklearn():
    pool = pool_like(2, 200, 16)
    dictionary = text_dictionary(pool)
    targets = targets_like(2, pool, 10)
    codes = omp(targets, dictionary, 30)  # more atoms than dimensions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sklearn warns "ended prematurely"
        expected = sklearn_codes(targets, dictionary, 30)
    np.testing.assert_array_equal(codes.dense().numpy() != 0, expected != 0)
    np.testing.assert_allclose(codes.dense().numpy(), expected, atol=1e-6, rtol=0)
    assert (codes.n_picked < 30).all() and (codes.atoms[:, 16:] == -1).all()
    torch.testing.assert_close(
        codes.reconstruct(dictionary), targets, atol=1e-8, rtol=0
    )  # 16 atoms span R^16


def test_a_target_in_the_dictionary_stops_after_one_atom():
    pool = pool_like(3, 50, 12)
    codes = omp(pool[[7]] * 3.0, pool, 5)
    assert codes.atoms[0].tolist() == [7, -1, -1, -1, -1]
    torch.testing.assert_close(codes.coefficients[0, 0], torch.tensor(3.0, dtype=torch.float64))


def test_authors_dictionary_is_centred_with_columns_of_norm_100():
    pool = pool_like(4, 80, 10) * 7.0  # the rows are normalised first
    dictionary = text_dictionary(pool)
    torch.testing.assert_close(dictionary.norm(dim=0), torch.full((10,), 100.0, dtype=torch.float64))
    torch.testing.assert_close(dictionary.mean(0), torch.zeros(10, dtype=torch.float64), atol=1e-12, rtol=0)
    unit = F.normalize(pool, dim=1)
    centred = unit - unit.mean(0)
    torch.testing.assert_close(dictionary, 100 * centred / centred.norm(dim=0))
    torch.testing.assert_close(text_dictionary(pool, "unit").norm(dim=1), torch.ones(80, dtype=torch.float64))
    assert text_dictionary(pool, "none") is pool


def test_codes_helpers():
    pool = pool_like(5, 60, 12)
    texts = [f"text {i}" for i in range(60)]
    codes = omp(targets_like(5, pool, 4), pool, 3)
    atoms, coefficients = codes.top()
    assert (coefficients.abs().diff(dim=1) <= 0).all()
    dense = codes.dense()
    for row in range(4):
        listed = codes.texts(texts, row)
        assert [t for t, _ in listed] == [texts[i] for i in atoms[row].tolist()]
        assert [c for _, c in listed] == pytest.approx([dense[row, i].item() for i in atoms[row].tolist()])
    torch.testing.assert_close(codes.reconstruct(pool), dense @ pool)
    both = SparseCodes.cat([codes, codes])
    assert len(both) == 8 and both.n_pool == 60
    torch.testing.assert_close(both.dense()[4:], dense)


def test_float32_inputs_compute_in_float32_and_agree_with_float64():
    pool = pool_like(6, 400, 32)
    dictionary = text_dictionary(pool)
    targets = targets_like(6, pool, 30)
    single = omp(targets.float(), dictionary.float(), 6)
    double = omp(targets, dictionary, 6)
    assert single.coefficients.dtype == torch.float32
    assert (single.atoms == double.atoms).float().mean() > 0.95  # near-ties may break differently
    torch.testing.assert_close(
        single.reconstruct(dictionary.float()).double(), double.reconstruct(dictionary), atol=2e-3, rtol=0
    )


def test_bad_arguments_are_refused():
    pool = pool_like(7, 20, 8)
    with pytest.raises(ValueError, match="1..20"):
        omp(pool[:2], pool, 21)
    with pytest.raises(ValueError, match=r"\[M, 8\]"):
        omp(pool[:2], pool[:, :4], 2)
    with pytest.raises(ValueError, match="finite"):
        omp(torch.full((1, 8), float("nan"), dtype=torch.float64), pool, 2)
    with pytest.raises(ValueError, match="normalisation"):
        text_dictionary(pool, "columns")
    with pytest.raises(ValueError, match="undefined"):
        text_dictionary(torch.ones(5, 3))
