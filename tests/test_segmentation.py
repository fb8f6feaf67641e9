"""Segmentation heatmaps: the re-run image tower against open_clip, and each method against its definition."""

from __future__ import annotations

import clipdecomp
import pytest
import torch
import torch.nn.functional as F
from clipdecomp import segmentation, spatial

from conftest import tiny_clip


@pytest.fixture(scope="module")
def model():
    return tiny_clip()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def classifier():
    return F.normalize(torch.randn(24, 5, generator=torch.Generator().manual_seed(4)), dim=0)


def _own_attention(model, images):
    """Per layer [B, H, N, N] attention weights from nn.MultiheadAttention itself (need_weights=True)."""
    weights = []

    def read(block):
        def hook(module, inputs, output):
            _, w = block.attn(output, output, output, need_weights=True, average_attn_weights=False)
            weights.append(w)

        return hook

    hooks = [b.ln_1.register_forward_hook(read(b)) for b in model.visual.transformer.resblocks]
    with torch.no_grad():
        model.encode_image(images)
    for hook in hooks:
        hook.remove()
    return weights


@pytest.mark.parametrize("overrides", [{}, {"layers": 2, "ls_init_value": 0.3, "width": 48, "head_width": 8}])
def test_trace_equals_encode_image_and_the_modules_attention(overrides, images):
    model = tiny_clip(**overrides)
    with torch.no_grad():
        trace = segmentation.trace_vision(model, images)
        torch.testing.assert_close(trace.features, model.encode_image(images), atol=1e-5, rtol=0)
    reference = _own_attention(model, images)
    assert len(trace.attentions) == len(reference)
    for mine, theirs in zip(trace.attentions, reference):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)


def test_to_pixels_clips_and_normalises():
    scores = torch.tensor([[-1.0, 0.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    maps = segmentation.to_pixels(scores, (2, 2), (2, 2))
    torch.testing.assert_close(maps, torch.tensor([[[0.0, 0.0], [1 / 3, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]))
    assert segmentation.to_pixels(scores, (2, 2), (8, 6)).shape == (2, 8, 6)


@pytest.mark.parametrize("name", list(segmentation.METHODS))
def test_every_method_shape_range_determinism_and_batch_independence(name, model, images, classifier):
    method = segmentation.METHODS[name]
    maps = method(model, images, classifier)
    assert maps.shape == (3, 32, 32) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert torch.allclose(maps.amax((1, 2)), torch.ones(3))  # min-max normalised, none constant here
    assert torch.equal(method(model, images, classifier), maps)
    torch.testing.assert_close(method(model, images[1:2], classifier), maps[1:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        segmentation.segment(name, model, images, classifier, batch_size=2), maps, atol=1e-5, rtol=0
    )


def test_raw_attention_and_rollout_follow_their_definitions(model, images):
    weights = [w.mean(1) for w in _own_attention(model, images)]  # heads averaged [B, N, N]
    grid = model.visual.grid_size
    expected = segmentation.to_pixels(weights[-1][:, 0, 1:], grid, (32, 32))
    torch.testing.assert_close(segmentation.raw_attention(model, images), expected, atol=1e-5, rtol=0)
    eye = torch.eye(weights[0].shape[-1])
    a0, a1, a2 = ((w + eye) / (w + eye).sum(-1, keepdim=True) for w in weights)
    expected = segmentation.to_pixels((a2 @ a1 @ a0)[:, 0, 1:], grid, (32, 32))
    torch.testing.assert_close(segmentation.rollout(model, images), expected, atol=1e-5, rtol=0)


def test_gradcam_matches_gradients_taken_through_open_clip(model, images, classifier):
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["tokens"] = output

    hook = model.visual.transformer.resblocks[-1].ln_1.register_forward_hook(keep)
    features = model.encode_image(images)
    hook.remove()
    logits = model.logit_scale.exp() * F.normalize(features, dim=-1) @ classifier
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    tokens, grad = captured["tokens"].detach()[:, 1:], captured["tokens"].grad[:, 1:]
    cam = (tokens * grad.mean(1, keepdim=True)).sum(-1).clamp_min(0)
    expected = segmentation.to_pixels(cam, model.visual.grid_size, (32, 32))
    model.zero_grad()
    torch.testing.assert_close(segmentation.gradcam(model, images, classifier), expected, atol=1e-5, rtol=0)


def test_chefer_is_the_product_of_identity_plus_weighted_attention(model, images, classifier):
    trace = segmentation.trace_vision(model, images)
    logits = model.logit_scale.exp() * F.normalize(trace.features, dim=-1) @ classifier
    grads = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), trace.attentions)
    eye = torch.eye(trace.attentions[0].shape[-1])
    c0, c1, c2 = (eye + (g * a.detach()).clamp_min(0).mean(1) for g, a in zip(grads, trace.attentions))
    expected = segmentation.to_pixels((c2 @ c1 @ c0)[:, 0, 1:], model.visual.grid_size, (32, 32))
    torch.testing.assert_close(segmentation.chefer(model, images, classifier), expected, atol=1e-5, rtol=0)


def test_decomposition_map_is_the_contrastive_patch_score(model, images, classifier):
    parts = clipdecomp.decompose(model, images, spatial=True)
    predicted = (parts.total() @ classifier).argmax(1)
    assert torch.equal(segmentation.predict(model, images, classifier), predicted)
    contrast = classifier - classifier.mean(1, keepdim=True)
    scores = torch.stack(
        [spatial.patch_scores(parts, contrast[:, c])[i] for i, c in enumerate(predicted.tolist())]
    )
    expected = segmentation.to_pixels(scores.flatten(1), parts.grid_size, (32, 32))
    torch.testing.assert_close(
        segmentation.decomposition(model, images, classifier), expected, atol=1e-5, rtol=0
    )
    chunked = segmentation.decomposition(model, images, classifier, layers_per_pass=1)
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=0)


def test_decomposition_map_variants_raw_class_and_some_layers(model, images, classifier):
    """centred=False scores along the raw class embedding; layers=[-1] keeps the last layer's heads."""
    predicted = segmentation.predict(model, images, classifier)

    def expected(parts, directions):
        scores = torch.stack(
            [spatial.patch_scores(parts, directions[:, c])[i] for i, c in enumerate(predicted)]
        )
        return segmentation.to_pixels(scores.flatten(1), parts.grid_size, (32, 32))

    everything = clipdecomp.decompose(model, images, spatial=True)
    raw = segmentation.decomposition(model, images, classifier, centred=False)
    torch.testing.assert_close(raw, expected(everything, classifier), atol=1e-5, rtol=0)
    last = clipdecomp.decompose(model, images, spatial=True, layers=[-1])
    contrast = classifier - classifier.mean(1, keepdim=True)
    only_last = segmentation.decomposition(model, images, classifier, layers=[-1])
    torch.testing.assert_close(only_last, expected(last, contrast), atol=1e-5, rtol=0)
    assert not torch.allclose(only_last, segmentation.decomposition(model, images, classifier), atol=1e-3)
    with pytest.raises(IndexError, match="out of range"):
        segmentation.decomposition(model, images, classifier, layers=[7])


def test_methods_depend_on_the_image_and_the_class(model, images, classifier):
    for name, method in segmentation.METHODS.items():
        maps = method(model, images, classifier)
        assert not torch.allclose(maps[0], maps[1], atol=1e-3), name
    swapped = classifier[:, segmentation.predict(model, images, classifier)[:1]]  # predicted class only
    other = torch.cat([swapped, -swapped], 1)  # now class 0 is predicted, with a different mean
    assert not torch.allclose(
        segmentation.decomposition(model, images[:1], other),
        segmentation.decomposition(model, images[:1], classifier)[:1],
        atol=1e-3,
    )


def test_bad_inputs_are_refused(model, images, classifier):
    with pytest.raises(ValueError, match="classifier"):
        segmentation.gradcam(model, images, classifier.T)
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        segmentation.rollout(model, torch.randn(1, 3, 16, 16))
    with pytest.raises(TypeError, match="float"):
        segmentation.raw_attention(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(KeyError, match="Unknown method"):
        segmentation.segment("lrp", model, images, classifier)
