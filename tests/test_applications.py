"""Spatial maps, head retrieval and spurious-cue helpers against plain calculations and known answers."""

from __future__ import annotations

import clipdecomp
import pytest
import torch
from clipdecomp import retrieval, spatial, spurious

from conftest import tiny_clip


@pytest.fixture(scope="module")
def spatial_parts():
    model = tiny_clip()
    return clipdecomp.decompose(
        model, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)), spatial=True
    )


def test_patch_scores_sum_to_the_head_projection(spatial_parts):
    direction = torch.randn(24)
    grid = spatial.patch_scores(spatial_parts, direction)
    assert grid.shape == (3, 4, 4)
    cls = spatial_parts.heads[:, :, 0].sum((1, 2)) @ direction
    torch.testing.assert_close(
        grid.sum((1, 2)) + cls, spatial_parts.attns.sum(1) @ direction, atol=1e-6, rtol=0
    )
    one = spatial.joint_map(spatial_parts, 2, 1, direction)
    torch.testing.assert_close(one.flatten(1), spatial_parts.heads[:, 2, 1:, 1] @ direction)


def test_heatmap_shapes_and_contrast(spatial_parts):
    a, b = torch.randn(24), torch.randn(24)
    heat = spatial.heatmap(spatial_parts, a, 32)
    assert heat.shape == (3, 32, 32)
    diff = spatial.contrastive_heatmap(spatial_parts, a, b, 32)
    torch.testing.assert_close(diff, heat - spatial.heatmap(spatial_parts, b, 32), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="spatial"):
        spatial.heatmap(clipdecomp.decompose(tiny_clip(), torch.randn(1, 3, 32, 32)), a, 32)


def test_nearest_neighbours():
    terms = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [-1, 0]])
    assert retrieval.nearest(terms, 0, k=2).tolist() == [1, 2]
    assert retrieval.nearest(terms, 0, k=1, exclude_self=False).tolist() == [0]
    with pytest.raises(IndexError):
        retrieval.nearest(terms, 9)


def test_group_report_known_answer():
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    predictions = torch.tensor([0, 0, 1, 0, 1, 1, 1, 0])  # group accuracies 1, .5, .5, 0
    report = spurious.group_report(predictions, labels, groups, n_boot=200)
    assert report.per_group == {0: 1.0, 1: 0.5, 2: 0.5, 3: 0.0}
    assert report.average == 0.5 and report.worst_group == 0.0
    assert report.average_ci[0] <= 0.5 <= report.average_ci[1]


def test_rank_heads_by_concept_finds_the_planted_head():
    gen = torch.Generator().manual_seed(0)
    concept = torch.nn.functional.normalize(torch.randn(2, 16, generator=gen), dim=-1)
    terms = 0.1 * torch.randn(200, 2, 3, 16, generator=gen)
    terms[:, 1, 2] += torch.randn(200, 2, generator=gen) @ concept * 3  # head (7, 2) writes the concept
    ranked = spurious.rank_heads_by_concept(terms, concept, head_layers=[6, 7])
    assert ranked[0][0] == (7, 2) and ranked[0][1] > 0.9


def test_choose_head_count_uses_validation_scores_and_random_sets():
    ranked = [(0, 1), (0, 2), (1, 0)]
    best, scores = spurious.choose_head_count(
        ranked, lambda heads: {0: 0.4, 1: 0.7, 2: 0.7, 3: 0.5}[len(heads)], [0, 1, 2, 3]
    )
    assert best == 1 and scores[3] == 0.5
    sets = spurious.random_head_sets(ranked, 2, trials=4, seed=1)
    assert len(sets) == 4 and all(len(set(s)) == 2 for s in sets)
