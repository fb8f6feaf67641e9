"""One component-label grammar: every label ``stack`` emits is accepted everywhere, and bad ones are named."""

from __future__ import annotations

import clipdecomp
import pytest
import torch
from clipdecomp.ablation import mean_ablate
from clipdecomp.components import Component, parse_label

from conftest import tiny_clip


@pytest.fixture(scope="module")
def spatial_parts() -> clipdecomp.Decomposition:
    g = torch.Generator().manual_seed(0)
    return clipdecomp.decompose(
        tiny_clip(), torch.randn(3, 3, 32, 32, generator=g), spatial=True, layers=[1, 2]
    )


@pytest.mark.parametrize("granularity", ["layer", "head", "patch"])
def test_every_stacked_label_round_trips(spatial_parts, granularity):
    stacked, labels = spatial_parts.stack(granularity)
    assert len(set(labels)) == len(labels)
    for k, label in enumerate(labels):
        assert str(parse_label(label)) == label
        part = spatial_parts[label]
        if part.ndim == 3:  # a spatial head: its key tokens
            part = part.sum(1)
        torch.testing.assert_close(part, stacked[:, k], atol=1e-6, rtol=0)
        ablated = mean_ablate(spatial_parts, [label])
        torch.testing.assert_close(
            ablated, spatial_parts.total() - stacked[:, k] + stacked[:, k].mean(0), atol=1e-5, rtol=0
        )


def test_cls_label_and_head_detail(spatial_parts):
    torch.testing.assert_close(spatial_parts["cls_1"], spatial_parts.cls_to_cls[:, 1].sum(1))
    assert spatial_parts["L1H0T0"].shape == (3, 24)
    with pytest.raises(KeyError, match="no head detail"):
        spatial_parts["L0H0"]


@pytest.mark.parametrize(
    "label, error, message",
    [
        ("L0H-1", IndexError, "head -1 is out of range"),
        ("L9H0", IndexError, "layer 9 is out of range"),
        ("L1H5", IndexError, "4 heads, valid 0..3"),
        ("mlp_-1", IndexError, "layer -1"),
        ("L1H0T99", IndexError, "token 99"),
        ("head_3", ValueError, "Unknown component"),
        ("L1H", ValueError, "labels look like"),
        (3, TypeError, "string"),
    ],
)
def test_bad_labels_are_refused_everywhere(spatial_parts, label, error, message):
    with pytest.raises(error, match=message):
        spatial_parts[label]
    with pytest.raises(error, match=message):
        mean_ablate(spatial_parts, [label])


def test_parse_without_sizes_and_formatting():
    assert parse_label("L3H1T5") == Component("token", 3, 1, 5)
    assert str(Component("cls", 2)) == "cls_2" and str(Component("embed")) == "embed"
    with pytest.raises(IndexError, match="0 or more"):
        parse_label("attn_-2")


@pytest.mark.parametrize("granularity", ["layer", "head", "patch"])
def test_attention_pool_labels_round_trip_and_sum(granularity):
    from test_backends import tiny_timm_siglip

    g = torch.Generator().manual_seed(1)
    parts = clipdecomp.decompose(tiny_timm_siglip(), torch.randn(2, 3, 32, 32, generator=g), spatial=True)
    stacked, labels = parts.stack(granularity)
    assert "pool_mlp" in labels
    torch.testing.assert_close(stacked.sum(1), parts.total(), atol=1e-5, rtol=0)
    for k, label in enumerate(labels):
        part = parts[label]
        torch.testing.assert_close(part.sum(1) if part.ndim == 3 else part, stacked[:, k], atol=1e-6, rtol=0)
