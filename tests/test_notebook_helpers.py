"""Helpers the chapters score the toy world with: neighbour agreement, chance level, pointing game,
random twin, cue signal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clipdecomp import retrieval, spatial, spurious
from clipdecomp.toy import groundtruth


def test_neighbour_agreement_counts_shared_values():
    # two tight clusters; the cluster is the attribute for `same`, alternates for `mixed`
    terms = torch.tensor([[1.0, 0], [0.9, 0.1], [0.95, 0.05], [0, 1], [0.1, 0.9], [0.05, 0.95]])
    same = torch.tensor([0, 0, 0, 1, 1, 1])
    assert retrieval.neighbour_agreement(terms, same, k=2).tolist() == [1.0] * 6
    mixed = np.array([0, 1, 0, 1, 0, 1])
    agreement = retrieval.neighbour_agreement(terms, mixed, k=2)
    # cluster {0, 1, 2} has values 0, 1, 0: image 0 has one same-valued neighbour of two, image 1 none
    assert agreement.tolist() == [0.5, 0.0, 0.5, 0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="k=6"):
        retrieval.neighbour_agreement(terms, same, k=6)


def test_agreement_by_head_finds_the_head_that_encodes_the_attribute():
    g = torch.Generator().manual_seed(0)
    values = torch.arange(60) % 3
    heads = torch.randn(60, 2, 3, 8, generator=g)
    heads[:, 1, 2] = torch.nn.functional.one_hot(values, 8).float() * 5 + 0.1 * heads[:, 1, 2]
    table = retrieval.agreement_by_head(heads, values, k=5)
    assert table.shape == (2, 3)
    assert table[1, 2] == 1.0 and table.flatten().argmax() == 5
    assert (table.flatten()[:5] < 0.7).all()


def test_chance_agreement_matches_random_neighbours():
    values = np.array([0] * 30 + [1] * 10)
    expected = (30 * 29 + 10 * 9) / (40 * 39)
    assert retrieval.chance_agreement(values) == pytest.approx(expected)
    g = torch.Generator().manual_seed(1)
    random_terms = torch.randn(40, 64, generator=g)
    measured = retrieval.neighbour_agreement(random_terms, values, k=10).mean().item()
    assert measured == pytest.approx(expected, abs=0.12)


def test_pointing_game():
    heat = torch.zeros(2, 4, 4)
    heat[0, 1, 1] = 1.0
    heat[1, 3, 3] = 1.0
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True
    assert spatial.pointing_game(heat, masks).tolist() == [True, False]
    with pytest.raises(ValueError, match="upsample"):
        spatial.pointing_game(heat, masks[:, :2])


def test_random_twin_has_the_architecture_but_not_the_weights(tmp_path):
    import json

    from safetensors.torch import save_file

    from conftest import tiny_clip

    vision = dict(image_size=32, patch_size=8, width=64, layers=3, head_width=16)
    text = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
    trained = tiny_clip()
    with torch.no_grad():
        trained.visual.proj.add_(1.0)  # stands in for training
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {"embed_dim": 24, "vision_cfg": vision, "text_cfg": text}})
    )
    save_file(
        {k: v.contiguous() for k, v in trained.state_dict().items()},
        str(tmp_path / "open_clip_model.safetensors"),
    )
    twin = groundtruth.random_twin(str(tmp_path), seed=3)
    state, twin_state = trained.state_dict(), twin.state_dict()
    assert state.keys() == twin_state.keys()
    assert all(state[k].shape == twin_state[k].shape for k in state)
    assert not torch.equal(state["visual.proj"], twin_state["visual.proj"])
    assert torch.equal(
        twin_state["visual.proj"], groundtruth.random_twin(str(tmp_path), seed=3).state_dict()["visual.proj"]
    )
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        groundtruth.random_twin(str(tmp_path / "missing"))


def test_cue_and_label_signal_separates_a_cue_head_from_a_label_head():
    import clipdecomp

    from conftest import tiny_clip

    g = torch.Generator().manual_seed(2)
    parts = clipdecomp.decompose(tiny_clip(), torch.randn(80, 3, 32, 32, generator=g))
    label = torch.arange(80) % 2
    cue = (torch.arange(80) // 2) % 2  # independent of the label
    direction = torch.zeros(24)
    direction[0] = 1.0
    heads = parts.heads.clone()
    heads[:, 1, 2, 0] = 10.0 * cue  # L1H2 writes the cue along the direction
    heads[:, 2, 0, 0] = 10.0 * label  # L2H0 writes the label
    from dataclasses import replace

    parts = replace(parts, heads=heads)
    labels, with_cue, within = spurious.cue_and_label_signal(parts, direction, label, cue)
    assert with_cue[labels.index("L1H2")] > 0.95 and abs(within[labels.index("L1H2")]) < 0.3
    assert within[labels.index("L2H0")] > 0.95 and abs(with_cue[labels.index("L2H0")]) < 0.3


def test_glue_without_myst_nb_displays_or_drops_the_value(monkeypatch, capsys):
    import sys

    from clipdecomp.notebook import glue

    monkeypatch.setitem(sys.modules, "myst_nb", None)  # as on Colab, where only the library is installed
    glue("hidden", "42%", display=False)
    glue("shown", "17%")
    assert capsys.readouterr().out.strip() == "17%"  # IPython's display, outside a kernel: print


def test_repository_is_found_from_an_editable_install_or_a_clone_in_the_working_folder(tmp_path, monkeypatch):
    from clipdecomp import paths

    assert (paths.repo_root() / "_toc.yml").is_file()  # this checkout (editable install)
    installed = tmp_path / "site-packages" / "clipdecomp" / "paths.py"
    monkeypatch.setattr(paths, "__file__", str(installed))  # as if installed from a clone, not editable
    (tmp_path / "clipdecomp").mkdir()
    (tmp_path / "clipdecomp" / "_toc.yml").write_text("root: intro\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLIPDECOMP_DATA", raising=False)
    assert paths.repo_root() == tmp_path / "clipdecomp"
    assert paths.data_dir() == tmp_path / "clipdecomp" / "data"
    monkeypatch.setenv("CLIPDECOMP_DATA", str(tmp_path / "elsewhere"))
    assert paths.data_dir() == tmp_path / "elsewhere"
