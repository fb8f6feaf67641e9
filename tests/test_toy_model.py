"""The shipped toy CLIP: offline loading, card integrity, reproducible accuracies, training, ground truth."""

from __future__ import annotations

import json
import time

import numpy as np
import open_clip
import pytest
import torch
from clipdecomp.loading import file_sha256, toy_model_dir
from clipdecomp.toy import groundtruth, train, world
from clipdecomp.zero_shot import TOY_TASKS, toy_zero_shot

TOY = toy_model_dir()


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((TOY / "card.json").read_text())


@pytest.fixture(scope="module")
def toy() -> tuple[torch.nn.Module, object]:
    start = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{TOY}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{TOY}")
    assert time.perf_counter() - start < 2.0, "the toy model must load offline in under 2 s"
    return model.eval(), tokenizer, preprocess


def test_card_hash_matches_weights(card):
    assert card["weights_sha256"] == file_sha256(TOY / card["weights"])


def test_architecture_suits_the_decomposition(toy):
    model, _, _ = toy
    vision = model.visual
    assert isinstance(vision, open_clip.transformer.VisionTransformer)
    assert vision.pool_type == "tok" and vision.attn_pool is None
    blocks = vision.transformer.resblocks
    assert len(blocks) >= 4 and all(isinstance(b.attn, torch.nn.MultiheadAttention) for b in blocks)
    assert blocks[0].attn.num_heads >= 4


def test_weights_rebuild_the_training_architecture(card, toy):
    from safetensors.torch import load_file

    model, tokenizer, _ = toy
    rebuilt = train.build_model(card["config"]).eval()
    rebuilt.load_state_dict({k: v.float() for k, v in load_file(TOY / card["weights"]).items()})
    x = world.to_tensor(world.sample(8, seed=3, split="uniform").images)
    tokens = tokenizer(["a red circle.", "an object in the top left."])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image(x), model.encode_image(x))
        torch.testing.assert_close(rebuilt.encode_text(tokens), model.encode_text(tokens))


def test_preprocess_equals_fast_path(toy):
    from PIL import Image

    _, _, preprocess = toy
    images = world.sample(4, seed=9, split="uniform").images
    slow = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    torch.testing.assert_close(slow, world.to_tensor(images), atol=1e-5, rtol=0)


def test_card_accuracies_reproduce_on_fresh_samples(card, toy):
    model, tokenizer, _ = toy
    torch.set_num_threads(1)
    assert card["eval"]["seed"] != 2024 and card["config"]["curve_seed"] != 2024
    fresh = toy_zero_shot(model, tokenizer, n=card["eval"]["n_per_split"], seed=2024)  # as many as the card
    shipped = card["zero_shot_accuracy"]
    for key in (*TOY_TASKS, "spurious"):
        assert abs(fresh[key] - shipped[key]) <= 0.02, (key, fresh[key], shipped[key])
    assert abs(fresh["spurious_worst"] - shipped["spurious_worst"]) <= 0.05


def test_three_training_steps_write_a_loadable_model(tmp_path):
    config = json.loads((TOY / "train_config.json").read_text())
    config["curve_n"] = 40
    config["curriculum"] = {**config.get("curriculum", {"data": {}}), "steps": 2}  # both phases run
    card = train.train(config, tmp_path, steps=3, eval_n=40)
    assert card["training_steps"] == 3 and len(card["curve"]) == 1
    assert card["weights_sha256"] == file_sha256(tmp_path / "open_clip_model.safetensors")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    x = world.to_tensor(world.sample(2, seed=1, split="uniform").images)
    assert model.eval().encode_image(x).shape == (2, config["model_cfg"]["embed_dim"])
    assert not (tmp_path / "checkpoint.pt").exists()


def test_multi_positive_targets():
    s = world.sample(32, seed=4)
    pos = train.positives(s)
    assert pos.diagonal().all()
    i, j = 0, 1
    named = [a for a, m in zip(world.CAPTION_ATTRIBUTES, s.mentions[j]) if m]
    assert pos[i, j] == all(s.attributes[a][i] == s.attributes[a][j] for a in named)
    logits = torch.where(pos, 10.0, -10.0)
    assert train.contrastive_loss(logits, pos) < train.contrastive_loss(-logits, pos)


def test_groundtruth_scores_find_the_planted_heads():
    rng = np.random.default_rng(0)
    n, layers, heads, d = 600, 3, 4, 8
    attrs = {"colour": rng.integers(0, 6, n), "size": rng.integers(0, 2, n)}
    x = torch.from_numpy(rng.normal(size=(n, layers, heads, d))).float()
    codes = torch.from_numpy(rng.normal(size=(6, d)) * 3).float()
    x[:, 2, 1] += codes[attrs["colour"]]  # head (2, 1) writes the colour
    x[:, 0, 3] = codes[attrs["size"]]  # head (0, 3) is a function of the size
    scores = groundtruth.head_scores(x, attrs, layers=[3, 4, 5], names=["colour", "size"])
    assert scores.scores.shape == (layers, heads, 2) and scores.attributes == ["colour", "size"]
    assert scores.best("colour", 1)[0][:2] == (5, 1) and scores["colour"][2, 1] > 0.8
    assert scores["size"][0, 3] == pytest.approx(1.0, abs=1e-5)
    noise = np.delete(scores["colour"].ravel(), [2 * heads + 1, 3])
    assert noise.max() < 0.05  # ~ (classes - 1) / n by chance
    x[:, 1, 0] = 0  # a silent head scores 0, not NaN
    assert groundtruth.head_scores(x, attrs, [3, 4, 5], ["colour", "size"])["colour"][1, 0] == 0
    roles = scores.roles(min_score=0.4, margin=2.0)
    assert roles["L5H1"] == "colour" and roles["L3H3"] == "size"
    assert sum(role is not None for role in roles.values()) == 2  # noise heads have no clear role
    with pytest.raises(ValueError, match="layers"):
        groundtruth.head_scores(x, attrs, layers=[0, 1])


def test_named_attribute_reads_the_toy_vocabulary():
    assert groundtruth.named_attribute(["a red circle", "a photo of something red", "on sand"]) == "colour"
    assert groundtruth.named_attribute(["an angular object", "a star shape"]) == "shape"
    assert groundtruth.named_attribute(["a cat"]) is None


def test_curriculum_overrides_the_batch_mix_until_it_ends():
    config = json.loads((TOY / "train_config.json").read_text())
    config["curriculum"] = {"steps": 5, "data": {"single_rate": 1.0, "position_rate": 0.0, "shape_rate": 1.0}}
    assert train.batch_options(config, 4)["shape_rate"] == 1.0
    assert train.batch_options(config, 5) == config["data"]
    shape_only = world.sample(64, 0, **train.batch_options(config, 0))
    assert (shape_only.mentions.sum(1) == 1).all()


def test_card_records_the_targets_it_was_measured_against(card):
    from clipdecomp.toy import targets

    rows = {row["what"]: row for row in card["targets"]}
    assert len(rows) == len(card["targets"]) >= 15
    for task, goal in targets.ZERO_SHOT.items():
        row = rows[f"zero-shot {task}, uncorrelated split"]
        assert row["measured"] == f"{card['zero_shot_accuracy'][task]:.1%}"
        assert row["met"] == (card["zero_shot_accuracy"][task] >= goal)
    assert all(isinstance(row["met"], bool) and row["target"] for row in rows.values())
