"""TEXT SPAN: the fast version picks exactly what the authors' loop picks, and finds known answers."""

from __future__ import annotations

import clipdecomp
import pytest
import torch
import torch.nn.functional as F
from clipdecomp.text_span import text_span, text_span_heads, text_span_reference

from conftest import tiny_clip


def head_like(seed: int, k: int, d: int, signal_rank: int, dtype=torch.float64) -> torch.Tensor:
    """Low-rank signal with a decaying spectrum, isotropic noise and an offset mean: [k, d]."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, signal_rank, dtype=torch.float64)
    signal = (torch.randn(k, signal_rank, generator=g, dtype=torch.float64) * scales) @ torch.randn(
        signal_rank, d, generator=g, dtype=torch.float64
    )
    noise = 0.05 * torch.randn(k, d, generator=g, dtype=torch.float64)
    return (signal + noise + torch.randn(d, generator=g, dtype=torch.float64)).to(dtype)


def pool_like(seed: int, n: int, d: int) -> torch.Tensor:
    """Correlated unit vectors, like CLIP text embeddings (a shared component plus clusters)."""
    g = torch.Generator().manual_seed(seed + 1000)
    common = torch.randn(d, generator=g)
    clusters = torch.randn(8, d, generator=g)
    which = torch.randint(0, 8, (n,), generator=g)
    return F.normalize(0.8 * common + clusters[which] + 0.7 * torch.randn(n, d, generator=g), dim=-1)


@pytest.mark.parametrize(
    "seed,k,d,n_texts,rank,m",
    [
        (0, 400, 32, 300, 20, 15),
        (1, 1000, 64, 500, 40, 20),
        (2, 50, 48, 120, 80, 30),
        (3, 300, 24, 2000, 80, 24),
        (4, 2000, 16, 60, 8, 8),
        (5, 200, 96, 400, 80, 40),
    ],
)
def test_picks_match_the_reference(seed, k, d, n_texts, rank, m):
    outputs, pool = head_like(seed, k, d, signal_rank=min(d, 12)), pool_like(seed, n_texts, d)
    fast, slow = text_span(outputs, pool, m=m, rank=rank), text_span_reference(outputs, pool, m=m, rank=rank)
    assert fast.indices.tolist() == slow.indices.tolist()
    assert len(fast.indices) == m and fast.rank == slow.rank == min(rank, k, d)
    torch.testing.assert_close(fast.scores, slow.scores, rtol=1e-9, atol=0)
    torch.testing.assert_close(fast.explained, slow.explained, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(fast.directions, slow.directions, rtol=0, atol=1e-9)
    torch.testing.assert_close(fast.reconstruction, slow.reconstruction, rtol=0, atol=1e-9)
    assert fast.total_variance == pytest.approx(slow.total_variance, rel=1e-12)


def test_float32_input_gives_the_float64_picks():
    outputs, pool = head_like(7, 500, 32, 10), pool_like(7, 300, 32)
    as32 = text_span(outputs.float(), pool.float(), m=10, rank=20)
    assert as32.reconstruction.dtype == torch.float32
    assert (
        as32.indices.tolist()
        == text_span_reference(outputs.float().double(), pool.float(), m=10, rank=20).indices.tolist()
    )


def test_rank_deficient_float32_heads_match_the_reference():
    """Like a real head (rank < r): the trailing basis vectors are rounding noise, which an SVD resolves
    but eigenvectors of the Gram matrix C^T C would not (picks then diverge after 2-6 steps)."""
    g = torch.Generator().manual_seed(0)
    spectrum = torch.logspace(0, -1, 30)
    outputs = (
        (torch.randn(800, 30, generator=g) * spectrum) @ torch.randn(30, 96, generator=g)
        + torch.randn(96, generator=g)
    ).float()
    pool = F.normalize(torch.randn(300, 96, generator=g) + 2 * torch.randn(96, generator=g), dim=-1)
    fast, slow = text_span(outputs, pool, m=30, rank=50), text_span_reference(outputs, pool, m=30, rank=50)
    assert fast.indices.tolist() == slow.indices.tolist()


def test_data_on_the_span_of_three_texts_picks_them_first():
    g = torch.Generator().manual_seed(0)
    d, k = 64, 500
    pool = F.normalize(torch.randn(80, d, generator=g, dtype=torch.float64), dim=-1)
    truth = [41, 7, 63]  # largest variance first
    coefficients = torch.randn(k, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0])
    outputs = coefficients @ pool[truth] + 0.5 + 1e-4 * torch.randn(k, d, generator=g, dtype=torch.float64)
    result = text_span(outputs, pool, m=6, rank=20)
    assert result.indices[:3].tolist() == truth
    assert result.cumulative_explained[2] > 0.9999
    assert result.explained[3:].sum() < 1e-4
    centred = outputs - outputs.mean(0)
    assert result.total_variance == pytest.approx(float(centred.var(0).sum()))
    # the first pick's score is the std of the data along that (normalised, unprojected) text
    assert result.scores[0] == pytest.approx(float((centred @ pool[truth[0]]).std()), rel=1e-6)


def test_directions_orthonormal_and_reconstruction_is_the_projection():
    outputs, pool = head_like(3, 300, 40, 15), pool_like(3, 200, 40)
    result = text_span(outputs, pool, m=12, rank=30)
    gram = result.directions @ result.directions.T
    torch.testing.assert_close(gram, torch.eye(12, dtype=torch.float64), atol=1e-10, rtol=0)
    q, _ = torch.linalg.qr(result.directions.T)  # an independent basis of the same span
    mean = outputs.mean(0)
    expected = mean + (outputs - mean) @ q @ q.T
    torch.testing.assert_close(result.reconstruction, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(result.project(outputs), result.reconstruction)
    residual = (outputs - result.reconstruction).var(0).sum() / result.total_variance
    assert float(result.cumulative_explained[-1]) == pytest.approx(1 - float(residual), abs=1e-10)
    torch.testing.assert_close(
        result.project(outputs, m=1),
        mean + torch.outer((outputs - mean) @ result.directions[0], result.directions[0]),
    )


def test_ties_pick_the_first_and_duplicates_are_never_picked_twice():
    outputs, pool = head_like(4, 300, 32, 8), pool_like(4, 100, 32)
    best = text_span(outputs, pool, m=1, rank=20).indices.item()
    doubled = torch.cat([pool, pool[best : best + 1]])  # an exact copy after the original
    with pytest.warns(UserWarning, match="duplicate"):
        fast = text_span(outputs, doubled, m=5, rank=20)
    with pytest.warns(UserWarning, match="duplicate"):
        slow = text_span_reference(outputs, doubled, m=5, rank=20)
    assert fast.indices[0].item() == best and 100 not in fast.indices.tolist()
    assert fast.indices.tolist() == slow.indices.tolist()


def test_stops_with_a_warning_when_the_pool_runs_out_of_directions():
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(200, 16, generator=g, dtype=torch.float64)
    basis = torch.eye(16, dtype=torch.float64)
    pool = torch.cat([basis[:3], basis[:3] + basis[1:4]])  # spans 4 directions only
    with pytest.warns(UserWarning, match="stopped after 4 of 6"):
        result = text_span(outputs, pool, m=6, rank=16)
    with pytest.warns(UserWarning, match="stopped after 4 of 6"):
        slow = text_span_reference(outputs, pool, m=6, rank=16)
    assert len(result.indices) == 4 and result.indices.tolist() == slow.indices.tolist()
    assert result.reconstruction.shape == outputs.shape


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda o, p: (o[0], p), "one head"),
        (lambda o, p: (o[:1], p), "at least 2 images"),
        (lambda o, p: (o[:, :10], p), "same CLIP model"),
        (
            lambda o, p: (o.index_put((torch.tensor([3]), torch.tensor([2])), torch.tensor(float("nan"))), p),
            "NaN",
        ),
        (lambda o, p: (o, p[:0]), "empty"),
        (lambda o, p: (o, p[:3]), "pool of 3"),
        (lambda o, p: (o, p.index_put((torch.tensor([1]),), torch.zeros(16))), "all zero"),
        (
            lambda o, p: (o, p.index_put((torch.tensor([1]), torch.tensor([0])), torch.tensor(float("inf")))),
            "NaN or Inf",
        ),
        (lambda o, p: (o.expand_as(o) * 0 + 1, p), "zero variance"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    g = torch.Generator().manual_seed(0)
    outputs, pool = torch.randn(30, 16, generator=g), torch.randn(40, 16, generator=g)
    with pytest.raises(ValueError, match=message):
        text_span(*change(outputs, pool), m=4, rank=8)


def test_m_larger_than_the_rank_is_refused():
    outputs, pool = torch.randn(30, 16), torch.randn(40, 16)
    with pytest.raises(ValueError, match=r"rank used, min\(rank=8, K=30, d'=16\) = 8"):
        text_span(outputs, pool, m=9, rank=8)
    with pytest.raises(ValueError, match="positive"):
        text_span(outputs, pool, m=0, rank=8)


def test_many_heads_match_one_at_a_time():
    stacked = torch.stack(
        [
            torch.stack([head_like(10 * l + h, 150, 24, 6, torch.float32) for h in range(3)], 1)
            for l in range(2)
        ],
        1,
    )  # [K, L=2, H=3, d']
    pool = pool_like(0, 90, 24)
    results = text_span_heads(stacked, pool, m=5, rank=12, layers=[4, 5])
    assert list(results) == ["L4H0", "L4H1", "L4H2", "L5H0", "L5H1", "L5H2"]
    for i, layer in enumerate([4, 5]):
        for h in range(3):
            single = text_span(stacked[:, i, h], pool, m=5, rank=12)
            assert results[f"L{layer}H{h}"].indices.tolist() == single.indices.tolist()
            assert results[f"L{layer}H{h}"].reconstruction is None
    as_dict = text_span_heads({"a": stacked[:, 0, 0]}, pool, m=5, rank=12, reconstruct=True)
    torch.testing.assert_close(
        as_dict["a"].reconstruction, text_span(stacked[:, 0, 0], pool, m=5, rank=12).reconstruction
    )
    with pytest.raises(ValueError, match="layer names"):
        text_span_heads(stacked, pool, m=5, rank=12, layers=[1])
    with pytest.raises(ValueError, match=r"\[K, L, H, d'\]"):
        text_span_heads(stacked[:, 0], pool, m=5, rank=12)


def test_runs_on_a_decomposition_of_a_tiny_clip():
    model = tiny_clip()
    images = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    parts = clipdecomp.decompose(model, images, layers=[1, 2])
    pool = F.normalize(torch.randn(50, 24, generator=torch.Generator().manual_seed(1)), dim=-1)
    results = text_span_heads(parts, pool, m=4, rank=10)
    assert sorted(results) == sorted(f"L{l}H{h}" for l in (1, 2) for h in range(4))
    result = results["L2H3"]
    assert result.indices.tolist() == text_span_reference(parts["L2H3"], pool, m=4, rank=10).indices.tolist()
    assert 0 < float(result.cumulative_explained[-1]) <= 1 + 1e-9
