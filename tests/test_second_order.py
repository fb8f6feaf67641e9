"""Second-order effects of neurons: the invariants of SECOND_ORDER.md section 1.9 on tiny ViTs and the toy."""

from __future__ import annotations

import fcntl
import json
import os

import clipdecomp
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from clipdecomp import second_order as so
from clipdecomp.cache import CacheLockedError, IncompleteCacheError, StaleCacheError
from clipdecomp.datasets import ToyDataset
from clipdecomp.seg_metrics import SegmentationMeter
from clipdecomp.sparse_texts import SparseCodes, omp, text_dictionary
from clipdecomp.towers import vision_tower

from conftest import tiny_clip

torch.set_num_threads(1)
PREPROCESS = open_clip.image_transform(32, is_train=False)


def rough_clip(layers: int = 4, **overrides) -> torch.nn.Module:
    """conftest's tiny CLIP with layer scale, every parameter perturbed: no bias or LayerNorm is trivial."""
    model = tiny_clip(**{"layers": layers, "ls_init_value": 0.7, **overrides})
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.visual.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def tiny_bundle(model: torch.nn.Module | None = None) -> clipdecomp.ClipBundle:
    return clipdecomp.ClipBundle(
        model=model or rough_clip(),
        preprocess=PREPROCESS,
        tokenizer=open_clip.get_tokenizer("ViT-B-32", context_length=16),
        spec="tiny",
    )


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return rough_clip()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def toy_bundle() -> clipdecomp.ClipBundle:
    return clipdecomp.load("toy")


def toy_images(bundle, n: int = 4, seed: int = 0) -> torch.Tensor:
    return bundle.preprocess_batch(clipdecomp.toy.sample(n, seed, split="uniform").images)


def close(actual: torch.Tensor, expected: torch.Tensor, relative: float = 1e-6) -> None:
    """Equal to fp32 rounding: within ``relative`` times the largest magnitude of ``expected``."""
    torch.testing.assert_close(actual, expected, atol=relative * expected.abs().max().item(), rtol=0)


def frozen_pass(model, images, layer, writes=False, literal=True):
    tower = vision_tower(model)
    later = tuple(range(layer + 1, tower.n_layers))
    return tower, so._run(tower, images, [layer], later, literal=literal, writes=writes), later


def literal_effect(tower, frozen, later, writes: torch.Tensor, share_of_layer: float) -> torch.Tensor:
    """The authors' steps for writes [B, T, K, D], each ``share_of_layer`` of a layer's output: [B, K, d']."""
    final = so._final(tower, writes.device)
    resid = frozen.final_input
    mu_f, sigma_f = resid.mean(-1), torch.sqrt(resid.var(-1, unbiased=False) + final.eps)
    total = 0
    for index in later:
        share = share_of_layer / (1 + 2 * index)
        weights = so._attention(tower.blocks[index], writes.device)
        total = total + so._literal_heads(
            writes, share, frozen, index, weights, final, sigma_f, mu_f, tower.n_layers
        ).sum(2)
    return total


# --- the factorised path equals the authors' literal loop -------------------------------------------


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_factorised_equals_literal_loop_on_a_tiny_vit(model, images, layer):
    fast = so.second_order(model, images, layer)
    slow = so.second_order_reference(model, images, layer)
    assert fast.effects.shape == (3, model.visual.transformer.resblocks[0].mlp.c_fc.out_features, 24)
    close(fast.effects, slow)
    assert slow.abs().max() > 0


def test_neuron_and_later_layer_options_select_the_same_terms(model, images):
    full = so.second_order_reference(model, images, 0)
    picked = so.second_order(model, images, 0, neurons=[5, 2, 200])
    close(picked.effects, full[:, [5, 2, 200]])
    assert picked.neurons.tolist() == [5, 2, 200]
    only = so.second_order(model, images, 0, later_layers=[2])
    close(only.effects, so.second_order_reference(model, images, 0, later_layers=[-2]))
    assert only.later_layers == (2,)


def test_shared_term_is_a_zero_activation_neuron_and_the_same_for_every_neuron(model, images):
    layer = 1
    result = so.second_order(model, images, layer)
    tower, frozen, later = frozen_pass(model, images, layer)
    width = so._width(tower.blocks[layer])
    b_out = so._mlp_out(tower.blocks[layer], images.device)[1]
    silent = b_out / width * torch.ones(*frozen.activations[layer].shape[:2], 1, 1)  # p = 0: only the shares
    expected = literal_effect(tower, frozen, later, silent, 1.0 / width)[:, 0]
    close(result.shared, expected)
    core = result.effects - result.shared[:, None]
    slow = so.second_order_reference(model, images, layer)
    close(slow - core, expected[:, None].expand_as(slow), relative=1e-4)


# --- invariants -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "toy"])
def test_effects_summed_over_neurons_equal_the_whole_mlp_through_the_same_pipeline(
    which, model, images, toy_bundle
):
    net, batch, layer = (
        (model, images, 1) if which == "tiny" else (toy_bundle.model, toy_images(toy_bundle), 2)
    )
    result = so.second_order(net, batch, layer)
    tower, frozen, later = frozen_pass(net, batch, layer, writes=True)
    whole = frozen.writes[f"mlp{layer}"][:, :, None]  # the model's own MLP output, bias included
    expected = literal_effect(tower, frozen, later, whole, 1.0)[:, 0]
    close(result.effects.sum(1), expected, relative=1e-5)


def test_whole_layer_effects_of_every_layer_in_one_pass(model, images):
    effects, embedding = so.mlp_effects(model, images)
    assert effects.shape == (3, 4, 24) and torch.count_nonzero(effects[:, -1]) == 0
    for layer in range(3):
        close(effects[:, layer], so.second_order(model, images, layer).effects.sum(1), relative=1e-5)
    torch.testing.assert_close(embedding, F.normalize(model.encode_image(images), dim=-1))


def test_all_pieces_of_a_block_input_through_one_head_sum_to_its_direct_term(model, images):
    """Anchors the shares: all pieces of block l's input, read the authors' way, sum to its head terms."""
    tower, frozen, _ = frozen_pass(model, images, 0, writes=True)
    index = 2
    pieces = [frozen.writes["embed"]] + [
        frozen.writes[f"{kind}{j}"] for j in range(index) for kind in ("attn", "mlp")
    ]
    writes = torch.stack(pieces, 2)  # [B, T, 1 + 2 l, D]
    final = so._final(tower, images.device)
    resid = frozen.final_input
    mu_f, sigma_f = resid.mean(-1), torch.sqrt(resid.var(-1, unbiased=False) + final.eps)
    heads = so._literal_heads(
        writes,
        1.0 / writes.shape[2],
        frozen,
        index,
        so._attention(tower.blocks[index], "cpu"),
        final,
        sigma_f,
        mu_f,
        tower.n_layers,
    )
    direct = clipdecomp.decompose(model, images, layers=[index]).heads[:, 0]
    torch.testing.assert_close(heads.sum(1), direct, atol=1e-6, rtol=1e-4)


def test_effects_are_linear_in_a_neurons_activation(model, images):
    layer, neuron, alpha = 0, 7, -2.5
    tower, frozen, later = frozen_pass(model, images, layer, literal=False)
    index = torch.arange(so._width(tower.blocks[layer]))
    before = so._effects(tower, frozen, layer, index, later)
    frozen.activations[layer][..., neuron] *= alpha  # attention and LayerNorms stay frozen
    after = so._effects(tower, frozen, layer, index, later)

    def core(r):
        return r.effects - r.shared[:, None]

    close(core(after)[:, neuron], alpha * core(before)[:, neuron])
    others = torch.arange(len(index)) != neuron
    torch.testing.assert_close(after.effects[:, others], before.effects[:, others], atol=0, rtol=0)


def test_last_layer_has_no_second_order_effect(model, images):
    result = so.second_order(model, images, -1)
    assert result.later_layers == () and result.layer == 3
    assert torch.count_nonzero(result.effects) == 0 and torch.count_nonzero(result.shared) == 0
    torch.testing.assert_close(result.embedding, F.normalize(model.encode_image(images), dim=-1))


def test_the_same_effects_through_the_hugging_face_clip_backend(model, images):
    from clipdecomp import towers

    if not hasattr(towers, "hugging_face_twin"):
        pytest.skip("clipdecomp.towers.hugging_face_twin (open_clip weights in HF CLIP) is not available")
    plain = rough_clip(ls_init_value=None)  # transformers' CLIP has no layer scale
    hf = towers.hugging_face_twin(plain)
    close(so.second_order(hf, images, 1).effects, so.second_order(plain, images, 1).effects)
    close(so.mlp_effects(hf, images)[0], so.mlp_effects(plain, images)[0])


def test_units_and_embedding(model, images):
    result = so.second_order(model, images, 0)
    features = model.encode_image(images)
    torch.testing.assert_close(result.norm, features.norm(dim=-1))
    torch.testing.assert_close(result.authors_units(), 100 * result.effects)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_accumulate_in_fp32(images, dtype):
    full = rough_clip()
    half = rough_clip().to(dtype)
    ref = so.second_order(full, images, 1)
    low = so.second_order(half, images.to(dtype), 1)
    assert low.effects.dtype == torch.float32
    scale = ref.effects.abs().max().item()
    assert (low.effects - ref.effects).abs().max().item() < 0.05 * scale


def test_bad_arguments_are_refused_with_the_range(model, images):
    with pytest.raises(IndexError, match="0..3"):
        so.second_order(model, images, 4)
    with pytest.raises(IndexError, match="MLP width"):
        so.second_order(model, images, 0, neurons=[256])
    with pytest.raises(IndexError, match="after the MLP layer 2"):
        so.second_order(model, images, 2, later_layers=[1])
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        so.second_order(model, images[:, :, :16], 0)


def test_attention_pool_towers_are_refused_with_the_reason(images):
    siglip = pytest.importorskip("test_backends").tiny_timm_siglip()  # no CLS token: an attention pool
    with pytest.raises(NotImplementedError, match="CLS query"):
        so.second_order(siglip, images, 0)


def test_readout_cache_follows_weight_edits(images):
    net = rough_clip()
    before = so.second_order(net, images, 0).effects
    with torch.no_grad():
        net.visual.transformer.resblocks[2].attn.out_proj.weight.mul_(2.0)
    after = so.second_order(net, images, 0).effects
    close(after, so.second_order_reference(net, images, 0))
    assert not torch.allclose(after, before)


# --- rank-1 model and the statistics store -------------------------------------------------------------


def test_rank1_directions_recover_a_planted_direction_with_the_sign_rule():
    generator = torch.Generator().manual_seed(0)
    direction = F.normalize(torch.randn(16, generator=generator), dim=0)
    scale = torch.cat([torch.full((7,), 2.0), torch.full((3,), -1.0)])  # 7 of 10 along +direction
    deltas = (scale[:, None] * direction + 1e-3 * torch.randn(10, 16, generator=generator))[None]
    found, explained = so.rank1_directions(torch.cat([deltas, -deltas]))
    torch.testing.assert_close(found[0], direction, atol=1e-3, rtol=0)
    torch.testing.assert_close(found[1], -direction, atol=1e-3, rtol=0)  # the majority sets the sign
    assert (explained > 0.999).all()
    torch.testing.assert_close(found.norm(dim=1), torch.ones(2))


def brute_force(bundle, data, layer, k):
    batch = torch.stack([data.image(i) for i in range(len(data))])
    effects = so.second_order(bundle, batch, layer).effects.double()
    mean = effects.mean(0)
    norms = (effects - mean).norm(dim=-1)  # [n, N]
    top = norms.topk(k, dim=0)
    return effects, mean, norms, top


def test_stats_equal_an_in_memory_calculation_and_the_significance_rate(tmp_path):
    bundle, data, k = tiny_bundle(), ToyDataset(13, seed=2, preprocess=PREPROCESS), 5  # odd k: no even split
    stats = so.SecondOrderStats.build(
        bundle, data, tmp_path / "s", 1, top_k=k, batch_size=3, checkpoint_every=6, progress=False
    )
    effects, mean, norms, top = brute_force(bundle, data, 1, k)
    np.testing.assert_allclose(stats.mean, mean, atol=1e-9)
    np.testing.assert_allclose(stats.top_norms, top.values.T, rtol=1e-5)
    np.testing.assert_array_equal(stats.top_images, top.indices.T.numpy())
    np.testing.assert_allclose(stats.thresholds, top.values[-1], rtol=1e-5)
    np.testing.assert_allclose(stats.energy, norms.pow(2).sum(0), rtol=1e-5)
    deltas = (effects - mean)[top.indices.T, torch.arange(effects.shape[1])[:, None]]  # [N, k, d']
    np.testing.assert_allclose(stats.top_deltas, deltas, atol=1e-6 * deltas.abs().max().item())
    directions = torch.from_numpy(np.array(stats.directions)).double()
    np.testing.assert_allclose(directions.norm(dim=1), 1, atol=1e-6)
    positive = (torch.einsum("nkd,nd->nk", deltas, directions) > 0).sum(1)
    assert (positive > k // 2).all()
    vh = torch.linalg.svd(deltas, full_matrices=False).Vh  # uncentred SVD
    np.testing.assert_allclose((directions * vh[:, 0]).sum(1).abs(), 1, atol=1e-5)
    batches = [
        torch.stack([data.image(i) for i in range(a, min(a + 3, 13))]) for a in range(0, 13, 3)
    ]  # as built
    significant = torch.cat([stats.significant(so.second_order(bundle, batch, 1)) for batch in batches])
    assert significant.sum(0).tolist() == [k - 1] * effects.shape[1]  # strictly above the k-th largest
    assert len(stats) == 13 and stats.layer == 1 and stats.later_layers == (2, 3) and stats.top_k == k
    reopened = so.SecondOrderStats.open(tmp_path / "s", expected_key=stats.key)
    np.testing.assert_array_equal(reopened.directions, stats.directions)


def test_mean_ablation_with_means_of_the_same_images_keeps_the_mean_logits(tmp_path):
    bundle, data = tiny_bundle(), ToyDataset(9, seed=3, preprocess=PREPROCESS)
    stats = so.SecondOrderStats.build(bundle, data, tmp_path / "s", 0, top_k=3, progress=False)
    batches = [torch.stack([data.image(i) for i in rows]) for rows in (range(5), range(5, 9))]
    evaluation = so.evaluate_layer(bundle, batches, stats, {"texts": stats.tensor("directions")})
    classifier = F.normalize(torch.randn(24, 5, generator=torch.Generator().manual_seed(0)), dim=0)
    original = evaluation.ablations["original"] @ classifier
    for name in so.ABLATIONS:
        assert evaluation.ablations[name].shape == (9, 24)
    torch.testing.assert_close(
        (evaluation.ablations["mean-ablated"] @ classifier).mean(0), original.mean(0), atol=1e-6, rtol=0
    )
    assert not torch.allclose(evaluation.ablations["mean-ablated"], evaluation.ablations["original"])
    kept = evaluation.ablations["insignificant kept"] + evaluation.ablations["significant kept"]
    torch.testing.assert_close(
        kept - evaluation.ablations["mean-ablated"], evaluation.ablations["original"], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        evaluation.ablations["texts"], evaluation.ablations["rank-1 kept"]
    )  # r_hat = r
    assert evaluation.projections.shape == (9, 256) and (evaluation.rank1_share <= 1 + 1e-6).all()
    assert evaluation.active.sum().item() == 256 * 2  # k - 1 = 2 significant images per neuron


class Interrupting(ToyDataset):
    """A toy dataset raising KeyboardInterrupt at its ``fail_at``-th image read (a killed run)."""

    fail_at: int | None = None
    reads = 0

    def image(self, index: int) -> torch.Tensor:
        self.reads += 1
        if self.reads == self.fail_at:
            raise KeyboardInterrupt
        return super().image(index)


@pytest.mark.parametrize("fail_at", [6, 12 + 7])  # during the means (pass 1), during the top images (pass 2)
def test_an_interrupted_build_resumes_to_the_same_statistics(tmp_path, fail_at):
    bundle = tiny_bundle()
    options = dict(top_k=3, batch_size=2, checkpoint_every=4, progress=False)
    fresh = so.SecondOrderStats.build(
        bundle, ToyDataset(12, seed=4, preprocess=PREPROCESS), tmp_path / "fresh", 2, **options
    )
    data = Interrupting(12, seed=4, preprocess=PREPROCESS)
    data.fail_at = fail_at
    with pytest.raises(KeyboardInterrupt):
        so.SecondOrderStats.build(bundle, data, tmp_path / "r", 2, **options)
    checkpoints = [p.name for p in (tmp_path / "r").glob("checkpoint_*")]
    assert checkpoints == ["checkpoint_1_000000004" if fail_at < 12 else "checkpoint_2_000000004"]
    assert not (tmp_path / "r" / "stats").exists()
    with pytest.raises(IncompleteCacheError, match="resume"):
        so.SecondOrderStats.open(tmp_path / "r")
    reads = data.reads
    resumed = so.SecondOrderStats.build(bundle, data, tmp_path / "r", 2, **options)
    assert data.reads - reads == 24 - 4 - (12 if fail_at > 12 else 0)  # only what the checkpoint lacked
    for name in ("mean", "top_norms", "top_images", "directions", "thresholds", "energy"):
        np.testing.assert_allclose(
            getattr(resumed, name), getattr(fresh, name), rtol=1e-5, atol=1e-9, err_msg=name
        )
    assert not list((tmp_path / "r").glob("checkpoint_*")) and not list((tmp_path / "r").glob(".*tmp*"))
    again = so.SecondOrderStats.build(bundle, data, tmp_path / "r", 2, **options)  # done: nothing recomputed
    assert data.reads - reads == 24 - 4 - (12 if fail_at > 12 else 0) and len(again) == 12
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())  # killed after the arrays were
    (tmp_path / "r" / "manifest.json").write_text(json.dumps({**manifest, "status": "building"}))  # saved
    redone = so.SecondOrderStats.build(bundle, data, tmp_path / "r", 2, **options)
    np.testing.assert_allclose(redone.directions, fresh.directions, rtol=1e-5, atol=1e-9)


def test_other_inputs_a_busy_folder_and_a_foreign_folder_are_refused(tmp_path):
    bundle, data = tiny_bundle(), ToyDataset(6, seed=5, preprocess=PREPROCESS)
    stats = so.SecondOrderStats.build(bundle, data, tmp_path / "s", 0, top_k=2, progress=False)
    with pytest.raises(StaleCacheError, match="top_k"):
        so.SecondOrderStats.build(bundle, data, tmp_path / "s", 0, top_k=3, progress=False)
    with pytest.raises(StaleCacheError, match="layer"):
        so.SecondOrderStats.open(
            tmp_path / "s", expected_key={**stats.key, "statistics": {**stats.key["statistics"], "layer": 1}}
        )
    other = ToyDataset(6, seed=6, preprocess=PREPROCESS)
    with pytest.raises(StaleCacheError, match="dataset"):
        so.SecondOrderStats.build(bundle, other, tmp_path / "s", 0, top_k=2, progress=False)
    (tmp_path / "busy").mkdir()
    handle = os.open(tmp_path / "busy", os.O_RDONLY)
    try:  # another process building: it holds the folder's lock
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CacheLockedError):
            so.SecondOrderStats.build(bundle, data, tmp_path / "busy", 0, top_k=2, progress=False)
    finally:
        os.close(handle)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        so.SecondOrderStats.build(bundle, data, tmp_path / "foreign", 0, top_k=2, progress=False)
    with pytest.raises(ValueError, match="last one"):
        so.SecondOrderStats.build(bundle, data, tmp_path / "last", -1, top_k=2, progress=False)
    with pytest.raises(ValueError, match="top_k=7 exceeds"):
        so.SecondOrderStats.build(bundle, data, tmp_path / "big", 0, top_k=7, progress=False)


# --- the paper's uses ----------------------------------------------------------------------------------


def test_neuron_segmentation_averages_the_most_aligned_neurons(model, images):
    directions = {
        1: F.normalize(torch.randn(256, 24, generator=torch.Generator().manual_seed(0)), dim=1),
        2: F.normalize(torch.randn(256, 24, generator=torch.Generator().manual_seed(1)), dim=1),
    }
    classifier = F.normalize(torch.randn(24, 3, generator=torch.Generator().manual_seed(2)), dim=0)
    method = so.neuron_segmentation(directions, n_neurons=5)
    maps = method(model, images, classifier)
    assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    activations, embedding = so.neuron_activations(model, images, [1, 2])
    table = torch.cat([directions[1], directions[2]])
    for b in range(3):
        predicted = int((embedding[b] @ classifier).argmax())
        chosen = (table @ classifier[:, predicted]).abs().topk(5).indices
        per_patch = torch.cat([activations[1][b, 1:], activations[2][b, 1:]], -1)[:, chosen].mean(-1)
        grid = F.interpolate(
            per_patch.reshape(1, 1, 4, 4), size=(32, 32), mode="bilinear", align_corners=False
        )[0, 0]
        expected = (grid - grid.min()) / (grid.max() - grid.min())
        torch.testing.assert_close(maps[b], expected, atol=1e-6, rtol=0)
    meter = SegmentationMeter()  # the library's Chefer-protocol metrics
    masks = maps > 0.5
    meter.update(masks.float(), masks)
    assert meter.compute().percent() == {"pixel acc": 100.0, "mIoU": 100.0, "mAP": 100.0}


def test_concepts_and_adversarial_words_match_dense_calculations(tmp_path):
    bundle, data = tiny_bundle(), ToyDataset(10, seed=7, preprocess=PREPROCESS)
    stats = so.SecondOrderStats.build(bundle, data, tmp_path / "s", 1, top_k=3, progress=False)
    pool = F.normalize(torch.randn(40, 24, generator=torch.Generator().manual_seed(3)), dim=1)
    dictionary = text_dictionary(pool)
    codes = omp(stats.tensor("directions"), dictionary, 4)
    result = so.second_order(bundle, torch.stack([data.image(i) for i in range(10)]), 1)
    _, scores = so.discover_concepts(result, stats, codes, k=3)
    size = stats.centred(result).norm(dim=-1)
    weight = size * stats.significant(result)
    dense = weight @ codes.dense()
    torch.testing.assert_close(scores, dense.topk(3, dim=1).values, atol=1e-7, rtol=1e-5)
    direction = pool[0] - pool[1]
    words, values = so.adversarial_words(
        direction, stats.tensor("directions"), codes, n_neurons=20, n_words=5, exclude=[0, 1]
    )
    push = stats.tensor("directions") @ direction
    chosen = push.abs().topk(20).indices
    eq6 = (codes.dense()[chosen] * push[chosen, None]).sum(0)
    eq6[[0, 1]] = -torch.inf
    torch.testing.assert_close(values, eq6.topk(5).values, atol=1e-7, rtol=1e-5)
    assert 0 not in words.tolist() and 1 not in words.tolist()
    best_pair = (codes.dense()[chosen] * push[chosen, None]).masked_fill(
        codes.dense()[chosen] == 0, -torch.inf
    )
    _, values = so.adversarial_words(
        direction, stats.tensor("directions"), codes, n_neurons=20, n_words=3, combine="max"
    )
    torch.testing.assert_close(values, best_pair.amax(0).topk(3).values, atol=1e-7, rtol=1e-5)
    with pytest.raises(ValueError, match="one code per neuron"):
        so.discover_concepts(result, stats, SparseCodes(codes.atoms[:3], codes.coefficients[:3], 40))


def test_cached_statistics_are_found_again_and_kept_apart_by_their_inputs(tmp_path):
    bundle, data = tiny_bundle(), ToyDataset(6, seed=9, preprocess=PREPROCESS)
    first = so.SecondOrderStats.cached(bundle, data, tmp_path, 0, top_k=2, progress=False)
    again = so.SecondOrderStats.cached(bundle, data, tmp_path, 0, top_k=2, progress=False)
    other = so.SecondOrderStats.cached(bundle, data, tmp_path, 0, top_k=3, progress=False)
    assert first.folder == again.folder != other.folder and first.folder.parent == tmp_path
    assert len(list(tmp_path.iterdir())) == 2


def test_stats_refuse_effects_of_another_layer(tmp_path, images):
    bundle, data = tiny_bundle(), ToyDataset(5, seed=8, preprocess=PREPROCESS)
    stats = so.SecondOrderStats.build(bundle, data, tmp_path / "s", 1, top_k=2, progress=False)
    with pytest.raises(ValueError, match="same options"):
        stats.significant(so.second_order(bundle, images, 0))


def test_command_line_builds_the_statistics(tmp_path, capsys):
    from clipdecomp.__main__ import main

    arguments = "second-order --model toy --data toy --n-images 8 --layer 4 --top-k 2 --no-progress --out"
    main([*arguments.split(), str(tmp_path / "cli")])
    stats = so.SecondOrderStats.open(tmp_path / "cli")
    assert len(stats) == 8 and stats.layer == 4 and stats.directions.shape == (192, 64)
    assert "SecondOrderStats" in capsys.readouterr().out
