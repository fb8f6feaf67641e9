"""Ground truth for the toy world: which attribute each attention head's direct contribution encodes.

For one head, collect its direct contributions ``c_i`` (one d'-vector per image) on images whose
attributes are drawn independently (``split="uniform"``) and group them by one attribute's value.
The score is the *between-class share of variance*

    S_a = sum_k n_k ||mean_k - mean||^2 / sum_i ||c_i - mean||^2,

the first-order sensitivity index of the head's output to attribute ``a`` (Sobol's index: the
variance of E[c | a] over the total variance). Because the attributes are independent, S_a measures
how much of the head's output moves when *only* ``a`` changes; the scores of one head sum to at most
about 1 (less where attributes interact). 0: the head ignores ``a``; 1: its output is a function of
``a`` alone.

A head has a clear *role* when one attribute's score is at least ``min_score`` and at least
``margin`` times every other attribute's (:meth:`HeadScores.roles`).

The control is a random-init twin of the same architecture (:func:`random_twin`). An untrained
network is a fixed function of its pixels, and the background covers most of them: every head of a
random twin scores S_background close to 1 and every other attribute close to 0. So a shape, colour
or position role is evidence of training by itself, while a background role is evidence only in a
trained model whose other heads have let the background go (training makes most heads drop it).
Chapter 3 puts the two models' tables side by side.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import open_clip
import torch

from ..loading import toy_model_dir
from .world import ATTRIBUTES

__all__ = [
    "ROLE_ATTRIBUTES",
    "NO_TRUTH",
    "HeadScores",
    "RoleAgreement",
    "variance_explained",
    "head_scores",
    "random_twin",
    "toy_samples",
    "named_attribute",
    "text_span_agreement",
]

ROLE_ATTRIBUTES = ("shape", "colour", "position", "size", "background")
"""The attributes a head's role is chosen from."""


@dataclass
class HeadScores:
    """Scores of every head for several attributes.

    Attributes:
        scores: float [layers, heads, attributes].
        attributes: the attribute names, in the order of the last axis.
        layers: the model layer of each row.
    """

    scores: np.ndarray
    attributes: list[str]
    layers: list[int]

    def __getitem__(self, attribute: str) -> np.ndarray:
        """The [layers, heads] table of one attribute."""
        return self.scores[..., self.attributes.index(attribute)]

    def best(self, attribute: str, k: int = 3) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring (layer, head, score) for ``attribute``."""
        table = self[attribute]
        order = np.argsort(table, axis=None)[::-1][:k]
        return [
            (self.layers[i // table.shape[1]], int(i % table.shape[1]), float(table.flat[i])) for i in order
        ]

    def roles(self, min_score: float = 0.4, margin: float = 2.0) -> dict[str, str | None]:
        """Head label ("L4H2") -> its clear role: the attribute scoring >= ``min_score`` and >= ``margin``
        times every other attribute, or ``None``."""
        result: dict[str, str | None] = {}
        for i, layer in enumerate(self.layers):
            for h in range(self.scores.shape[1]):
                row = self.scores[i, h]
                top, second = np.sort(row)[::-1][:2] if len(row) > 1 else (row[0], 0.0)
                clear = top >= min_score and top >= margin * max(second, 0.0)
                result[f"L{layer}H{h}"] = self.attributes[int(row.argmax())] if clear else None
        return result

    def table(self) -> "pd.DataFrame":  # noqa: F821 (pandas is imported lazily)
        """One row per head ("L4H2"), one column per attribute."""
        import pandas as pd

        index = [f"L{layer}H{h}" for layer in self.layers for h in range(self.scores.shape[1])]
        return pd.DataFrame(
            self.scores.reshape(-1, len(self.attributes)), index=index, columns=self.attributes
        )


def variance_explained(contributions: torch.Tensor, labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Between-class share of variance, per head.

    Args:
        contributions: [n, ..., d] direct contributions (e.g. [n, layers, heads, d]).
        labels: int [n], the class of each image.

    Returns:
        [...] (e.g. [layers, heads]) scores in [0, 1]; 0 for a head whose output never varies.
    """
    x = contributions.double()
    labels = torch.as_tensor(np.asarray(labels)).long()
    centred = x - x.mean(0, keepdim=True)
    total = centred.pow(2).sum(dim=(0, -1))
    between = torch.zeros_like(total)
    for k in labels.unique():
        members = centred[labels == k]
        between += len(members) * members.mean(0).pow(2).sum(-1)
    return torch.where(total > 0, between / total.clamp_min(1e-300), torch.zeros_like(total)).float()


def head_scores(
    contributions: torch.Tensor,
    attributes: Mapping[str, np.ndarray],
    layers: Sequence[int],
    names: Sequence[str] = ROLE_ATTRIBUTES,
) -> HeadScores:
    """Score every head of ``contributions`` [n, layers, heads, d] for each attribute.

    Args:
        contributions: per-head direct contributions, e.g. ``parts.head_terms()`` on uniform toy images.
        attributes: ``ToySamples.attributes`` of the same images (name -> int array [n]).
        layers: the model layer of each row of ``contributions`` (``parts.head_layers``).
        names: which attributes to score.
    """
    if contributions.shape[1] != len(layers):
        raise ValueError(
            f"contributions cover {contributions.shape[1]} layers but {len(layers)} layer ids given."
        )
    table = torch.stack([variance_explained(contributions, attributes[a]) for a in names], dim=-1)
    return HeadScores(table.numpy(), list(names), list(layers))


def random_twin(spec: str = "toy", seed: int = 0) -> open_clip.model.CLIP:
    """A random-init CLIP with the architecture of a local model (``"toy"`` or an open_clip local-dir folder).

    The control of the ground-truth scores: what a network of the same shape shows before training.
    """
    folder = toy_model_dir() if spec == "toy" else Path(spec).expanduser()
    config = folder / "open_clip_config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"No open_clip_config.json in {folder}: random_twin needs 'toy' or a local-dir "
            "model folder (open_clip_config.json + weights)."
        )
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**json.loads(config.read_text())["model_cfg"]).eval()


_VOCABULARY = {a: [re.compile(rf"\b{re.escape(v)}\b") for v in ATTRIBUTES[a]] for a in ROLE_ATTRIBUTES}
_VOCABULARY["shape"] += [
    re.compile(rf"\b{v}\b") for v in ATTRIBUTES["label"]
]  # round / angular are shape words


def named_attribute(texts: Sequence[str]) -> str | None:
    """The attribute that ``texts`` name most often by the toy world's value words (ties: first text wins)."""
    named = [a for text in texts for a, words in _VOCABULARY.items() if any(w.search(text) for w in words)]
    return Counter(named).most_common(1)[0][0] if named else None


NO_TRUTH = "n/a (no ground truth for real data)"


def toy_samples(images) -> "ToySamples | None":  # noqa: F821
    """The toy-world samples behind an evaluation set (their attributes are the ground truth), else
    ``None``: real images have no ground truth."""
    return getattr(images.dataset, "samples", None)


@dataclass
class RoleAgreement:
    """TEXT SPAN's description of each head next to its ground-truth role (:func:`text_span_agreement`).

    Attributes:
        scores: the trained model's head scores; ``twin``: the same for its random-init twin (both
            ``None`` for images without ground truth).
        table: one row per head: its role (or "—"), its top score, the attribute its first texts name,
            the texts, and ✓/✗ where the head has a role; without ground truth, one row saying so.
    """

    scores: HeadScores | None
    twin: HeadScores | None
    table: "pd.DataFrame"  # noqa: F821

    @property
    def with_role(self) -> int:
        """How many heads have a clear role."""
        return int((self.table["role"] != "—").sum()) if self.scores is not None else 0

    @property
    def agree(self) -> int:
        """How many of those heads TEXT SPAN names correctly."""
        return int((self.table["agree"] == "✓").sum()) if self.scores is not None else 0

    def facts(self) -> dict[str, str]:
        """Chapter 3's prose values: ``gt_agree`` (heads named right), ``gt_twin_background`` (the twin's
        lowest background score) and ``gt_twin_other`` (its highest other score); "n/a" without truth."""
        if self.scores is None:
            return dict.fromkeys(("gt_agree", "gt_twin_background", "gt_twin_other"), NO_TRUTH)
        twin = self.twin.table()
        return {
            "gt_agree": f"{self.agree} of the {self.with_role} heads",
            "gt_twin_background": f"{twin['background'].min():.2f}",
            "gt_twin_other": f"{twin.drop(columns='background').max().max():.2f}",
        }


def text_span_agreement(
    bundle,
    images,
    parts,
    spans,
    pool: Sequence[str],
    first: int = 3,
    min_score: float = 0.4,
    margin: float = 2.0,
) -> RoleAgreement:
    """Compare each head's TEXT SPAN texts with its ground-truth role, on toy-world images.

    Args:
        bundle: the model (its random-init twin is built from ``bundle.spec``).
        images: the :class:`~clipdecomp.evaluation.EvaluationSet` the spans were fitted on.
        parts: its decomposition (with head detail), ``spans``: ``text_span_heads`` results by head label,
            ``pool``: the texts the spans index.
        first: how many of each head's first texts vote on the attribute they name.

    Images without ground truth (anything but the toy world) give an agreement that says so.
    """
    import pandas as pd

    from ..decomposition import decompose_batches

    samples = toy_samples(images)
    if samples is None:
        return RoleAgreement(None, None, pd.DataFrame({"ground truth": [NO_TRUTH]}, index=["—"]))
    attributes = {name: values[images.indices] for name, values in samples.attributes.items()}
    scores = head_scores(parts.head_terms(), attributes, parts.head_layers)
    pixels = torch.stack([images.dataset.image(int(i)) for i in images.indices])
    twin_parts = decompose_batches(random_twin(bundle.spec), pixels, layers=parts.head_layers)
    twin = head_scores(twin_parts.head_terms(), attributes, parts.head_layers)
    rows, table = {}, scores.table()
    for label, role in scores.roles(min_score, margin).items():
        texts = spans[label].texts(pool)[:first]
        named = named_attribute(texts)
        top = table.loc[label]
        rows[label] = {
            "role": role or "—",
            "top score": f"{top.max():.2f} ({top.idxmax()})",
            "TEXT SPAN names": named or "—",
            "first texts": " | ".join(texts),
            "agree": ("✓" if named == role else "✗") if role else "",
        }
    return RoleAgreement(scores, twin, pd.DataFrame(rows).T)
