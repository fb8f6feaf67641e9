"""Text pools: they load, have the promised sizes and content, and regenerate byte for byte."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from clipdecomp.pools import POOL_NAMES, load_pool, pools_dir, random_directions
from clipdecomp.toy import ATTRIBUTES


@pytest.mark.parametrize(
    "name,low,high", [("descriptions", 2_500, 3_500), ("words", 3_500, 3_500), ("toy", 300, 600)]
)
def test_named_pools_load_with_sizes_in_range(name, low, high):
    pool = load_pool(name)
    assert low <= len(pool) <= high
    assert len(set(pool)) == len(pool)
    assert all(text and text == text.strip() and "\n" not in text for text in pool)


def test_pool_contents():
    descriptions = load_pool("descriptions")
    for example in [
        "A semicircular arch",
        "Picture taken in Cyprus",
        "Image with a red color",
        "The letter A",
        "Three dogs",
        "A watercolor painting",
        "A photo taken at sunset",
        "A striped texture",
    ]:
        assert example in descriptions
    words = load_pool("words")
    assert words[:3] == ["the", "to", "and"]
    assert all(w.isascii() and w.isalpha() and w == w.lower() for w in words)
    toy = " ".join(load_pool("toy"))
    for attribute in ("shape", "colour", "position", "size", "background"):
        for value in ATTRIBUTES[attribute]:
            assert value in toy, f"toy pool never mentions {attribute}={value!r}"
    assert "hexagon" in toy and "dog" in toy  # distractors the toy world does not contain


def test_regeneration_matches_the_committed_files(tmp_path):
    pytest.importorskip("wordfreq")
    spec = importlib.util.spec_from_file_location("make_pools", pools_dir() / "make_pools.py")
    make_pools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_pools)
    make_pools.main(["--out", str(tmp_path)])
    for name in POOL_NAMES:
        assert (tmp_path / f"{name}.txt").read_bytes() == (pools_dir() / f"{name}.txt").read_bytes(), (
            f"{name}.txt is stale: rerun `python data/pools/make_pools.py`"
        )


def test_any_path_loads_and_duplicates_are_dropped_with_a_warning(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("a cat\n\n  a dog  \na cat\nun café\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="dropped 1 repeated"):
        assert load_pool(path) == ["a cat", "a dog", "un café"]
    path.write_text("a cat\na dog\n", encoding="utf-8")
    assert load_pool(str(path)) == ["a cat", "a dog"]


def test_empty_and_missing_pools_raise(tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no text"):
        load_pool(empty)
    with pytest.raises(FileNotFoundError, match="one text per line"):
        load_pool(tmp_path / "nope.txt")
    monkeypatch.setenv("CLIPDECOMP_DATA", str(tmp_path))  # a data folder without pools
    with pytest.raises(FileNotFoundError, match="make_pools.py"):
        load_pool("words")


def test_random_directions_are_seeded_unit_vectors():
    a = random_directions(500, 64, seed=3)
    assert a.shape == (500, 64) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=1), torch.ones(500))
    assert torch.equal(a, random_directions(500, 64, seed=3))
    assert not torch.equal(a, random_directions(500, 64, seed=4))
    assert abs(float(a.mean())) < 0.01  # no preferred direction
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        random_directions(0, 64)
