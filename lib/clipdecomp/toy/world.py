"""A synthetic "toy world" with ground truth, on which the book's default CLIP is trained.

Every image shows one coloured shape on a textured background. Its attributes are known exactly:

* ``shape`` (6), ``colour`` (6), ``position`` (3 x 3 grid), ``size`` (small / large),
  ``background`` (5 procedural textures).
* ``label``: a binary *spurious-correlation* task (a Waterbirds analogue). Circles, rings and hearts
  are ``round``; squares, triangles and stars are ``angular``. Water and snow are ``cold``
  backgrounds; grass, sand and wood are ``warm`` ones.

Recipe of the spurious correlation (``SPURIOUS_RATE`` = 0.95):

* ``split="train"`` (and ``"val"``): the label is drawn 50/50, then the background *type* agrees with
  it (round -> cold, angular -> warm) with probability 0.95; the background is uniform within the type.
* ``split="test_groups"``: the four (label x background type) groups come in equal numbers
  (``sample i`` is in group ``i % 4``), so the worst group can be measured.
* ``split="uniform"``: every attribute independent and uniform (no correlation) — the zero-shot
  evaluation of the ordinary attributes uses it.

Objects have a radius of 12 or 16 px on a 3 x 3 grid of centres 16 / 32 / 48 px, so with 8-px patches
a shape's outline spans several patches, and objects cover about 12% of the pixels.

Each image also gets one caption. By default half the captions name a single attribute ("a red
object", "something on sand", "an object in the top left"); the rest name a random subset of two or
more ("a large blue star in the bottom right on sand"). ``mentions`` records which attributes a
caption names, so a contrastive loss can treat every caption whose named attributes match an image as
a positive for it. Training options of :func:`sample` shape the mix: ``position_rate`` and
``shape_rate`` make a caption's focus the position or the shape more often; ``hard_negatives``
arranges groups of near-duplicate images that differ in one attribute (``hn_position``,
``hn_shape``: how often that attribute is the position or the shape); ``label_majority`` names
"round"/"angular" only for majority-group images, as web captions of birds name them mostly in
their usual habitat.

Seeds: ``sample(n, seed, split=...)`` is a pure function of its arguments. The split name is mixed
into the random stream, so a training seed never produces the same images as an evaluation seed.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = [
    "ATTRIBUTES",
    "CAPTION_ATTRIBUTES",
    "MEAN",
    "PROMPTS",
    "SPLITS",
    "SPURIOUS_RATE",
    "STD",
    "ToySamples",
    "class_prompts",
    "group_names",
    "prompt_templates",
    "sample",
    "spurious_split",
    "to_tensor",
]

SIZE = 64
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
"""The toy model's input normalisation (per channel, on [0, 1] pixels)."""
SPURIOUS_RATE = 0.95
SPLITS = ("train", "val", "uniform", "test_groups")

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "ring", "heart", "square", "triangle", "star"],
    "colour": ["red", "orange", "yellow", "green", "blue", "purple"],
    "position": [
        "top left",
        "top",
        "top right",
        "left",
        "center",
        "right",
        "bottom left",
        "bottom",
        "bottom right",
    ],
    "size": ["small", "large"],
    "background": ["water", "snow", "grass", "sand", "wood"],
    "label": ["round", "angular"],
    "place": ["cold", "warm"],
}
"""Attribute name -> value names; ``attributes[name][i]`` indexes into these lists."""

CAPTION_ATTRIBUTES = ("shape", "colour", "position", "size", "background", "label")
"""The attributes a caption can name, in the column order of ``ToySamples.mentions``."""

ROUND_SHAPES = (0, 1, 2)
COLD_BACKGROUNDS = (0, 1)

PROMPTS: dict[str, list[str]] = {
    "shape": ["a photo of a {}.", "a {}.", "a {} shape."],
    "colour": ["a photo of a {} object.", "a {} object.", "something {}."],
    "position": ["a photo of an object in the {}.", "an object in the {}.", "something in the {}."],
    "size": ["a photo of a {} object.", "a {} object.", "a {} shape."],
    "background": ["a photo of something on {}.", "an object on {}.", "a photo of {}."],
    "label": ["a photo of a {} object.", "a {} object.", "a {} shape."],
}
"""Zero-shot prompt templates per attribute; ``"label"`` is the spurious binary task."""

COLOURS_RGB = np.array(
    [[220, 40, 40], [245, 140, 20], [240, 220, 40], [40, 180, 60], [40, 80, 230], [150, 50, 200]],
    dtype=np.float32,
)
GRID = np.array([16.0, 32.0, 48.0])
"""Centres (px) of the 3 x 3 position grid."""
RADII = np.array([12.0, 16.0])
"""Radius (px) of a small and of a large object; large enough that a patch of 8 px sees a shape's outline."""
GROUP = 4


@dataclass
class ToySamples:
    """A batch of toy-world samples.

    Attributes:
        images: uint8 [n, H, W, 3] RGB.
        masks: bool [n, H, W], the object's pixels.
        attributes: name -> int array [n] indexing ``ATTRIBUTES[name]``.
        captions: one caption per image.
        mentions: bool [n, len(CAPTION_ATTRIBUTES)], which attributes each caption names.
    """

    images: np.ndarray
    masks: np.ndarray
    attributes: dict[str, np.ndarray]
    captions: list[str]
    mentions: np.ndarray

    def __len__(self) -> int:
        return len(self.captions)

    def describe(self, i: int) -> dict[str, str]:
        """The attribute names of sample ``i``, e.g. ``{"shape": "star", ...}``."""
        return {k: ATTRIBUTES[k][int(v[i])] for k, v in self.attributes.items()}

    def crosstab(self, rows: str, columns: str) -> "pd.DataFrame":  # noqa: F821
        """How often each value of attribute ``columns`` comes with each value of ``rows`` (rows sum to 1).

        >>> share = sample(400, seed=0, split="train").crosstab("label", "place")  # the spurious cue
        >>> bool(share.loc["round", "cold"] > 0.8), share.sum(axis=1).round(6).tolist()
        (True, [1.0, 1.0])
        """
        import pandas as pd

        names = {a: np.array(ATTRIBUTES[a])[self.attributes[a]] for a in (rows, columns)}
        return pd.crosstab(
            names[rows], names[columns], normalize="index", rownames=[rows], colnames=[columns]
        )


def to_tensor(images: np.ndarray) -> "torch.Tensor":  # noqa: F821 (torch is imported lazily)
    """uint8 [n, H, W, 3] -> normalised float [n, 3, H, W], equal to the toy model's open_clip preprocess."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def _articles(text: str) -> str:
    """Fix indefinite articles: 'a orange object' -> 'an orange object'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def prompt_templates(attribute: str) -> list[Callable[[str], str]]:
    """``attribute``'s templates as functions ``value -> prompt``, articles fixed ("an orange object")."""
    return [
        lambda value, template=template: _articles(template.format(value)) for template in PROMPTS[attribute]
    ]


def class_prompts(attribute: str) -> list[list[str]]:
    """Zero-shot prompts for ``attribute``: one list of filled-in templates per class."""
    return [[fill(value) for fill in prompt_templates(attribute)] for value in ATTRIBUTES[attribute]]


def group_names() -> list[str]:
    """Names of the four spurious groups, in the order of ``group = 2 * label + place``."""
    return [f"{lab} on {pl}" for lab in ATTRIBUTES["label"] for pl in ATTRIBUTES["place"]]


def _rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


def _draw_attributes(rng: np.random.Generator, n: int, split: str) -> dict[str, np.ndarray]:
    if split == "test_groups":
        group = np.arange(n) % 4
        label, place = group // 2, group % 2
    else:
        label = rng.integers(0, 2, n)
        if split == "uniform":
            place = rng.integers(0, 2, n)
        else:
            place = np.where(rng.random(n) < SPURIOUS_RATE, label, 1 - label)
    shape = np.where(label == 0, rng.integers(0, 3, n), rng.integers(3, 6, n))
    background = np.where(place == 0, rng.integers(0, 2, n), rng.integers(2, 5, n))
    return {
        "shape": shape,
        "colour": rng.integers(0, 6, n),
        "position": rng.integers(0, 9, n),
        "size": rng.integers(0, 2, n),
        "background": background,
        "label": label,
        "place": place,
    }


def _hard_negative_groups(
    rng: np.random.Generator, attrs: dict[str, np.ndarray], groups: int, hn_position: float, hn_shape: float
) -> np.ndarray:
    """Turn the first ``groups * GROUP`` samples into groups of near-duplicates, in place.

    Within a group every attribute is copied from its first sample except one *focus* attribute,
    which stays as drawn: the position for a share ``hn_position`` of the groups, the shape for
    ``hn_shape``, else one of colour, size or background. Shape and background stay within the
    group's label and background type, so the spurious rate holds.
    Returns the focus attribute's ``CAPTION_ATTRIBUTES`` column per sample (-1 outside groups).
    """
    n = len(attrs["shape"])
    focus = np.full(n, -1)
    others = np.array([CAPTION_ATTRIBUTES.index(a) for a in ("colour", "size", "background")])
    for g in range(groups):
        rows = np.arange(g * GROUP, (g + 1) * GROUP)
        u = rng.random()
        if u < hn_position:
            col = CAPTION_ATTRIBUTES.index("position")
        elif u < hn_position + hn_shape:
            col = CAPTION_ATTRIBUTES.index("shape")
        else:
            col = int(rng.choice(others))
        focus[rows] = col
        for name in ("shape", "colour", "position", "size", "background", "label", "place"):
            if name != CAPTION_ATTRIBUTES[col]:
                attrs[name][rows] = attrs[name][rows[0]]
        if col == CAPTION_ATTRIBUTES.index("shape"):
            attrs["shape"][rows] = 3 * attrs["label"][rows] + rng.integers(0, 3, GROUP)
        if col == CAPTION_ATTRIBUTES.index("background"):
            cold = attrs["place"][rows] == 0
            attrs["background"][rows] = np.where(cold, rng.integers(0, 2, GROUP), rng.integers(2, 5, GROUP))
    return focus


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled uniform noise in [0, 1], [n, SIZE, SIZE]."""
    coarse = rng.random((n, cells + 1, cells + 1), dtype=np.float32)
    t = np.linspace(0, cells, SIZE, endpoint=False, dtype=np.float32)
    i = t.astype(int)
    f = t - i
    rows = coarse[:, i] * (1 - f)[None, :, None] + coarse[:, i + 1] * f[None, :, None]
    return rows[:, :, i] * (1 - f) + rows[:, :, i + 1] * f


def _backgrounds(rng: np.random.Generator, kinds: np.ndarray) -> np.ndarray:
    """Float RGB [n, SIZE, SIZE, 3] in [0, 255]: textures water, snow, grass, sand, wood."""
    n = len(kinds)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    out = np.empty((n, SIZE, SIZE, 3), np.float32)
    palettes = {  # (dark, light) RGB per texture
        0: ([20, 60, 140], [80, 150, 220]),
        1: ([200, 210, 225], [250, 252, 255]),
        2: ([30, 100, 30], [110, 190, 70]),
        3: ([190, 160, 100], [240, 215, 160]),
        4: ([100, 60, 30], [170, 115, 65]),
    }
    for kind, (dark, light) in palettes.items():
        idx = np.flatnonzero(kinds == kind)
        if len(idx) == 0:
            continue
        m = len(idx)
        phase = rng.uniform(0, 2 * np.pi, (m, 1, 1)).astype(np.float32)
        freq = rng.uniform(0.8, 1.2, (m, 1, 1)).astype(np.float32)
        noise = _smooth_noise(rng, m, 8)
        if kind == 0:  # water: wavy horizontal bands
            t = 0.5 + 0.5 * np.sin(0.6 * freq * y + 1.5 * np.sin(0.15 * x + phase) + phase)
            t = 0.75 * t + 0.25 * noise
        elif kind == 1:  # snow: bright, soft blotches with sparkles
            t = 0.6 + 0.4 * noise
            t = np.where(rng.random((m, SIZE, SIZE)) < 0.03, 1.0, t)
        elif kind == 2:  # grass: thin vertical blades
            blades = 0.5 + 0.5 * np.sin(1.9 * freq * x + 2.0 * np.sin(0.2 * y + phase))
            t = 0.6 * blades + 0.4 * rng.random((m, SIZE, SIZE), dtype=np.float32)
        elif kind == 3:  # sand: fine diagonal ripples and grain
            t = 0.5 + 0.5 * np.sin(0.45 * freq * (x + y) + phase)
            t = 0.55 * t + 0.2 * noise + 0.25 * rng.random((m, SIZE, SIZE), dtype=np.float32)
        else:  # wood: planks with curved grain
            grain = 0.5 + 0.5 * np.sin(1.1 * freq * y + 3.0 * noise + phase)
            seams = (np.mod(y + 16 * phase / np.pi, 16) < 1).astype(np.float32)
            t = 0.8 * grain * (1 - seams) + 0.2 * noise
        dark, light = np.array(dark, np.float32), np.array(light, np.float32)
        out[idx] = dark + np.clip(t, 0, 1)[..., None] * (light - dark)
    return out


def _masks(attrs: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """bool [n, SIZE, SIZE]: each shape drawn in coordinates (u, v) scaled to its radius."""
    pos, n = attrs["position"], len(attrs["shape"])
    cy = GRID[pos // 3] + rng.uniform(-1.5, 1.5, n)
    cx = GRID[pos % 3] + rng.uniform(-1.5, 1.5, n)
    r = RADII[attrs["size"]] * rng.uniform(0.93, 1.07, n)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    u = (x - cx[:, None, None].astype(np.float32)) / r[:, None, None].astype(np.float32)
    v = (y - cy[:, None, None].astype(np.float32)) / r[:, None, None].astype(np.float32)
    d2 = u * u + v * v
    shape = attrs["shape"][:, None, None]
    angle = np.arctan2(u, -v)  # 0 points up
    spike = np.abs(np.mod(angle * 5 / (2 * np.pi) + 0.5, 1.0) - 0.5) * 2  # 0 at a tip, 1 between
    hx, hy = 1.15 * u, -1.15 * v + 0.25
    heart = (hx * hx + hy * hy - 1) ** 3 - hx * hx * hy**3 <= 0
    triangle = (v <= 0.85) & (np.abs(u) <= 0.65 * (v + 1.05))
    masks = np.select(
        [shape == 0, shape == 1, shape == 2, shape == 3, shape == 4, shape == 5],
        [
            d2 <= 1,
            (d2 <= 1) & (d2 >= 0.3),
            heart,
            np.maximum(np.abs(u), np.abs(v)) <= 0.82,
            triangle,
            np.sqrt(d2) <= 1.05 - 0.45 * spike,
        ],
    )
    return masks.astype(bool)


_SINGLE = {
    "shape": ["a {}.", "a photo of a {}.", "a {} shape."],
    "colour": ["a {} object.", "something {}.", "a photo of a {} thing."],
    "position": ["an object in the {}.", "something in the {}.", "a photo of an object in the {}."],
    "size": ["a {} object.", "a photo of a {} thing.", "a {} shape."],
    "background": ["something on {}.", "a photo of {}.", "an object on {}."],
    "label": ["a {} object.", "a {} shape.", "a photo of a {} thing."],
}


def _compose(names: dict[str, str], rng: np.random.Generator) -> str:
    """A multi-attribute caption such as 'a large blue star in the bottom right on sand.'"""
    noun = names.get("shape") or ("shape" if "label" in names and rng.random() < 0.5 else "object")
    text = " ".join(["a"] + [names[k] for k in ("size", "colour", "label") if k in names] + [noun])
    if "position" in names:
        text += f" in the {names['position']}"
    if "background" in names:
        text += f" on {names['background']}"
    return ("a photo of " + text if rng.random() < 0.3 else text) + "."


def _captions(
    attrs: dict[str, np.ndarray],
    rng: np.random.Generator,
    single_rate: float,
    position_rate: float,
    shape_rate: float,
    label_majority: bool,
    focus: np.ndarray,
) -> tuple[list[str], np.ndarray]:
    n, k = len(attrs["shape"]), len(CAPTION_ATTRIBUTES)
    label_col = CAPTION_ATTRIBUTES.index("label")
    mentions = np.zeros((n, k), bool)
    single = rng.random(n) < single_rate
    u = rng.random(n)
    drawn = np.select(
        [u < position_rate, u < position_rate + shape_rate],
        [CAPTION_ATTRIBUTES.index("position"), CAPTION_ATTRIBUTES.index("shape")],
        rng.integers(0, k, n),
    )
    focus = np.where(focus >= 0, focus, drawn)
    no_label = (attrs["label"] != attrs["place"]) if label_majority else np.zeros(n, bool)
    focus = np.where(no_label & (focus == label_col), rng.integers(0, k - 1, n), focus)
    mentions[np.flatnonzero(single), focus[single]] = True
    multi = np.flatnonzero(~single)
    mentions[multi] = rng.random((len(multi), k)) < 0.5
    mentions[multi, label_col] &= rng.random(len(multi)) < 0.3
    mentions[multi, rng.integers(0, k, len(multi))] = True  # at least one named ...
    mentions[no_label, label_col] = False
    mentions[multi, focus[multi]] = True  # ... usually two or more
    captions = []
    for i in range(n):
        names = {a: ATTRIBUTES[a][attrs[a][i]] for a, m in zip(CAPTION_ATTRIBUTES, mentions[i]) if m}
        if len(names) == 1:
            ((a, value),) = names.items()
            templates = _SINGLE[a]
            captions.append(_articles(templates[rng.integers(len(templates))].format(value)))
        else:
            captions.append(_articles(_compose(names, rng)))
    return captions, mentions


def sample(
    n: int,
    seed: int = 0,
    *,
    split: str = "train",
    single_rate: float = 0.5,
    position_rate: float = 0.0,
    shape_rate: float = 0.0,
    hard_negatives: float = 0.0,
    hn_position: float = 0.5,
    hn_shape: float = 0.125,
    label_majority: bool = False,
) -> ToySamples:
    """Draw ``n`` toy-world samples; a pure function of its arguments.

    Args:
        n: number of samples.
        seed: random seed. Training and evaluation use different ``split`` names, whose streams differ.
        split: ``"train"``/``"val"`` (spurious correlation), ``"uniform"`` (independent attributes) or
            ``"test_groups"`` (balanced spurious groups, group ``i % 4``).
        single_rate: fraction of captions that name exactly one attribute.
        position_rate: extra probability that a caption's focus attribute is the position.
        shape_rate: extra probability that a caption's focus attribute is the shape.
        hard_negatives: fraction of the samples (at the start of the batch) arranged in groups of
            ``GROUP`` near-duplicates that differ in one attribute, which their captions name; a
            contrastive loss can then only tell them apart through that attribute.
        hn_position: share of the hard-negative groups whose images differ in position.
        hn_shape: share of the hard-negative groups whose images differ in shape (within the label).
        label_majority: name the label ("round"/"angular") only in captions of majority-group images
            (label and background type agree), as web captions of waterbirds mostly show them on water.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for name, rate in [
        ("single_rate", single_rate),
        ("position_rate", position_rate),
        ("shape_rate", shape_rate),
        ("hard_negatives", hard_negatives),
        ("hn_position", hn_position),
        ("hn_shape", hn_shape),
    ]:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {rate!r}")
    if position_rate + shape_rate > 1 or hn_position + hn_shape > 1:
        raise ValueError("position_rate + shape_rate and hn_position + hn_shape must each be at most 1")
    rng = _rng(seed, split)
    attrs = _draw_attributes(rng, n, split)
    focus = _hard_negative_groups(rng, attrs, int(n * hard_negatives) // GROUP, hn_position, hn_shape)
    masks = _masks(attrs, rng)
    images = _backgrounds(rng, attrs["background"])
    colour = COLOURS_RGB[attrs["colour"]] + rng.uniform(-15, 15, (n, 3)).astype(np.float32)
    shade = 1.0 - 0.12 * _smooth_noise(rng, n, 4)[..., None]
    images = np.where(masks[..., None], colour[:, None, None, :] * shade, images)
    images = np.clip(images, 0, 255).astype(np.uint8)
    captions, mentions = _captions(attrs, rng, single_rate, position_rate, shape_rate, label_majority, focus)
    return ToySamples(images, masks, attrs, captions, mentions)


def spurious_split(n: int, seed: int = 0) -> ToySamples:
    """The balanced test set of the spurious task: ``n`` samples, group ``i % 4``."""
    return sample(n, seed, split="test_groups")
