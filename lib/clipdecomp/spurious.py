"""Removing a spurious cue by mean-ablating heads (the paper's Waterbirds experiment).

A classifier that leans on the background fails on the groups where background and label disagree.
If some heads write mostly "place" information, mean-ablating them removes the cue. This module
ranks heads by how much of what they write lies along a concept (e.g. texts about places), picks
how many to ablate on a validation split, and reports per-group accuracy with bootstrap confidence
intervals, beside a baseline that ablates the same number of random heads.

:func:`spurious_task` builds the whole experiment for the toy world (round vs angular objects on
cold vs warm backgrounds) or for a Waterbirds folder behind one call, and
:meth:`SpuriousTask.compare` runs it:

    >>> task = spurious_task(clipdecomp.load("toy"), "toy", n_test=64, n_val=64, cache_dir=tmp_path)
    >>> result = task.compare(max_heads=2, random_trials=2, n_boot=10)
    >>> result.base.worst_group <= result.base.average
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .ablation import all_mlps, attention_layers, heads_of, mean_ablate
from .decomposition import Decomposition
from .loading import ClipBundle
from .zero_shot import OPENAI_IMAGENET_TEMPLATES, group_accuracy, zero_shot_classifier

__all__ = [
    "AUTHORS_HEADS",
    "GroupReport",
    "SpuriousComparison",
    "SpuriousSplit",
    "SpuriousTask",
    "choose_head_count",
    "cue_and_label_signal",
    "group_report",
    "random_head_sets",
    "rank_heads_by_concept",
    "spurious_task",
]

AUTHORS_HEADS: dict[str, list[tuple[int, int]]] = {
    "ViT-B-16": [(11, 3), (10, 11), (10, 10), (9, 8), (9, 6), (11, 6), (11, 0)],
    "ViT-L-14": [
        (21, 1),
        (22, 12),
        (22, 13),
        (21, 11),
        (21, 14),
        (23, 6),
        (21, 3),
        (21, 6),
        (21, 8),
        (21, 13),
        (22, 2),
        (22, 15),
        (23, 1),
        (23, 3),
        (23, 5),
    ],
    "ViT-H-14": [(31, 12), (30, 11), (29, 4), (31, 8), (30, 15), (30, 12), (30, 6), (29, 14), (29, 8)],
}
"""The authors' Waterbirds head lists per architecture, (layer, head), 0-based (PAPER.md)."""

WATERBIRDS_PLACES = [
    "ocean",
    "lake",
    "river",
    "beach",
    "sea",
    "forest",
    "bamboo forest",
    "woods",
    "grass field",
    "mountains",
]
"""Place names spanning the Waterbirds "place" concept (real mode)."""


@dataclass
class GroupReport:
    """Accuracies (fractions) with 95% bootstrap intervals ``(low, high)``."""

    average: float
    average_ci: tuple[float, float]
    worst_group: float
    worst_group_ci: tuple[float, float]
    per_group: dict[int, float]
    per_group_ci: dict[int, tuple[float, float]]

    def row(self) -> dict[str, str]:
        """Percentages with intervals, for a table."""
        fmt = lambda v, ci: f"{v:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]"  # noqa: E731
        return {
            "average": fmt(self.average, self.average_ci),
            "worst group": fmt(self.worst_group, self.worst_group_ci),
        }

    def group_table(self, group_names: Sequence[str]) -> "pd.DataFrame":  # noqa: F821
        """One row per group: its accuracy and 95% interval, as percentages."""
        import pandas as pd

        rows = {
            group_names[g]: {
                "accuracy": f"{self.per_group[g]:.1%}",
                "95% interval": f"[{low:.1%}, {high:.1%}]",
            }
            for g, (low, high) in self.per_group_ci.items()
        }
        return pd.DataFrame(rows).T


def group_report(
    predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, n_boot: int = 1000, seed: int = 0
) -> GroupReport:
    """Average, worst-group and per-group accuracy, with percentile bootstrap CIs resampled within groups."""
    correct = (predictions.cpu() == labels.cpu()).numpy().astype(float)
    groups = groups.cpu().numpy()
    ids = sorted(np.unique(groups).tolist())
    members = {g: np.flatnonzero(groups == g) for g in ids}
    rng = np.random.default_rng(seed)
    boot_group = {g: np.empty(n_boot) for g in ids}
    boot_average = np.empty(n_boot)
    for b in range(n_boot):
        hits = 0.0
        for g in ids:
            sample = correct[rng.choice(members[g], size=len(members[g]))]
            boot_group[g][b] = sample.mean()
            hits += sample.sum()
        boot_average[b] = hits / len(correct)
    boot_worst = np.min(np.stack([boot_group[g] for g in ids]), axis=0)
    ci = lambda values: (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))  # noqa: E731
    per_group = {g: float(correct[members[g]].mean()) for g in ids}
    return GroupReport(
        average=float(correct.mean()),
        average_ci=ci(boot_average),
        worst_group=min(per_group.values()),
        worst_group_ci=ci(boot_worst),
        per_group=per_group,
        per_group_ci={g: ci(boot_group[g]) for g in ids},
    )


def rank_heads_by_concept(
    head_terms: torch.Tensor, concept: torch.Tensor, head_layers: Sequence[int]
) -> list[tuple[tuple[int, int], float]]:
    """Rank heads by the fraction of their variance that lies in the span of ``concept`` directions.

    Args:
        head_terms: [n, L', H, d'] direct contributions over a (validation) set of images.
        concept: [k, d'] text embeddings describing the concept (e.g. places, habitats, backgrounds).
        head_layers: the layer index of each of the L' rows.
    Returns:
        ``[((layer, head), fraction), ...]`` sorted from the most concept-laden head.
    """
    basis = torch.linalg.qr(concept.T.to(head_terms)).Q  # [d', k] orthonormal span
    centred = head_terms - head_terms.mean(0)
    total = centred.pow(2).sum((0, -1))
    inside = (centred @ basis).pow(2).sum((0, -1))
    fraction = (inside / total.clamp_min(1e-12)).cpu()
    ranked = [
        ((head_layers[i], h), float(fraction[i, h]))
        for i in range(fraction.shape[0])
        for h in range(fraction.shape[1])
    ]
    return sorted(ranked, key=lambda item: -item[1])


def choose_head_count(
    ranked: Sequence[tuple[int, int]],
    worst_group_accuracy: Callable[[list[tuple[int, int]]], float],
    counts: Sequence[int],
) -> tuple[int, dict[int, float]]:
    """Pick how many top-ranked heads to ablate by worst-group accuracy on a VALIDATION split.

    ``worst_group_accuracy(heads)`` must evaluate on validation data only; the test split is never
    looked at. Returns the best count (the smallest among ties) and the score of every count tried.
    """
    scores = {k: worst_group_accuracy(list(ranked[:k])) for k in counts}
    best = max(scores.values())
    return min(k for k, v in scores.items() if v == best), scores


def random_head_sets(
    all_heads: Sequence[tuple[int, int]], k: int, trials: int = 5, seed: int = 0
) -> list[list[tuple[int, int]]]:
    """``trials`` random sets of ``k`` distinct heads: the baseline for any head selection."""
    rng = np.random.default_rng(seed)
    return [
        [tuple(all_heads[i]) for i in rng.choice(len(all_heads), size=k, replace=False)]
        for _ in range(trials)
    ]


def _correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    scale = (x.norm() * y.norm()).item()
    return float((x @ y).item() / scale) if scale > 0 else 0.0


def cue_and_label_signal(
    parts: Decomposition, direction: torch.Tensor, label: torch.Tensor, cue: torch.Tensor
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """What each component's share of a logit difference tracks: the spurious cue, or the label.

    For every part of ``parts.stack("head")`` (labels ``"embed"``, ``"L3H1"``, ``"mlp_2"``, ...), its
    score is ``term @ direction`` (e.g. ``direction = classifier[:, 1] - classifier[:, 0]``). Returns the
    labels, the correlation of each score with ``cue`` ([n] 0/1), and its correlation with ``label``
    *within* each cue value (averaged over the cue values). Ablating components can only help the
    worst group if some remaining component has a label correlation within the cue.
    """
    terms, labels = parts.stack("head")
    scores = terms.float() @ direction.float().to(terms.device)
    cue, label = torch.as_tensor(cue), torch.as_tensor(label)
    with_cue = torch.tensor([_correlation(scores[:, k], cue) for k in range(len(labels))])
    within = torch.tensor(
        [
            np.mean([_correlation(scores[cue == v, k], label[cue == v]) for v in cue.unique()])
            for k in range(len(labels))
        ]
    )
    return labels, with_cue, within


@dataclass
class SpuriousSplit:
    """One split of a spurious-cue task: its decomposition (head detail in the searched layers), its
    labels and groups."""

    parts: Decomposition
    y: torch.Tensor
    group: torch.Tensor

    @property
    def place(self) -> torch.Tensor:
        """The cue (background type) of each image: ``group = 2 * y + place``."""
        return self.group % 2


@dataclass
class SpuriousComparison:
    """The outcome of :meth:`SpuriousTask.compare`, all on the test split except the choice.

    Attributes:
        ranked: ``[((layer, head), fraction in the concept span), ...]`` on validation, best first.
        val_scores: head count -> validation worst-group accuracy.
        chosen: the top-ranked heads validation chose (possibly none).
        rows: condition name -> test :class:`GroupReport` ("base", "random heads, best of k",
            "chosen heads", the authors' condition, their head lists in real mode).
        random_reports: one report per random head set of the chosen size.
    """

    ranked: list[tuple[tuple[int, int], float]]
    val_scores: dict[int, float]
    chosen: list[tuple[int, int]]
    rows: dict[str, GroupReport]
    random_reports: list[GroupReport]

    @property
    def base(self) -> GroupReport:
        return self.rows["base"]

    @property
    def chosen_report(self) -> GroupReport:
        return self.rows["chosen heads"]

    @property
    def best_random(self) -> GroupReport:
        return max(self.random_reports, key=lambda r: r.worst_group) if self.random_reports else self.base

    def gains(self) -> dict[str, float]:
        """Worst-group gains (fractions) over the base model: chosen heads, best and mean random set."""
        base = self.base.worst_group
        mean_random = (
            float(np.mean([r.worst_group for r in self.random_reports])) if self.random_reports else base
        )
        return {
            "chosen": self.chosen_report.worst_group - base,
            "best random": self.best_random.worst_group - base,
            "mean random": mean_random - base,
        }

    def table(self) -> "pd.DataFrame":  # noqa: F821 (pandas is imported lazily)
        """Average and worst-group test accuracy with 95% intervals, one row per condition."""
        import pandas as pd

        rows = {name: report.row() for name, report in self.rows.items()}
        if self.random_reports:
            worst = [r.worst_group for r in self.random_reports]
            average = [r.average for r in self.random_reports]
            rows[f"random heads ({len(self.chosen)}), mean of {len(worst)}"] = {
                "average": f"{np.mean(average):.1%} (draws {min(average):.1%} to {max(average):.1%})",
                "worst group": f"{np.mean(worst):.1%} (draws {min(worst):.1%} to {max(worst):.1%})",
            }
        return pd.DataFrame(rows).T


@dataclass
class SpuriousTask:
    """A binary task whose zero-shot classifier can lean on a spurious cue, ready to ablate heads on.

    Attributes:
        name: ``"toy"`` or ``"waterbirds"``.
        class_names, group_names: display names (``group = 2 * y + place``).
        classifier: [d', 2] zero-shot class embeddings.
        concept: [k, d'] text embeddings spanning the cue (places / backgrounds).
        val, test: the two balanced splits.
        n_layers: layers of the model; ``search_layers`` those whose heads are ranked.
        authors_heads: the authors' published head list for this architecture (real mode), else ``None``.
        examples: the first (up to 8) test images, uint8 [H, W, 3] each, to show.
        text_pool: the text pool that describes its heads (``clipdecomp.load_pool``): ``"toy"`` for the
            toy world, ``"descriptions"`` for real photos.
    """

    name: str
    class_names: list[str]
    group_names: list[str]
    classifier: torch.Tensor
    concept: torch.Tensor
    val: SpuriousSplit
    test: SpuriousSplit
    n_layers: int
    search_layers: list[int]
    authors_heads: list[tuple[int, int]] | None = None
    examples: Sequence[np.ndarray] = field(default=(), repr=False)
    text_pool: str = "toy"

    def predictions(self, split: SpuriousSplit, ablate: Sequence[str] = ()) -> torch.Tensor:
        """[n] predicted classes with the named components mean-ablated (means over that split)."""
        return (mean_ablate(split.parts, list(ablate)) @ self.classifier.to(split.parts.embedding)).argmax(1)

    def report(self, ablate: Sequence[str] = (), split: str = "test", n_boot: int = 1000) -> GroupReport:
        """Average / worst-group / per-group accuracy with bootstrap intervals after ablating ``ablate``."""
        data = {"test": self.test, "val": self.val}[split]
        return group_report(self.predictions(data, ablate), data.y, data.group, n_boot=n_boot)

    def ranked_heads(self) -> list[tuple[tuple[int, int], float]]:
        """Heads of the searched layers ranked by their variance in the concept span, on validation."""
        return rank_heads_by_concept(self.val.parts.head_terms(), self.concept, self.val.parts.head_layers)

    def compare(
        self, max_heads: int = 8, random_trials: int = 5, n_boot: int = 1000, seed: int = 0
    ) -> SpuriousComparison:
        """Choose the head count on validation, then evaluate every condition once on the test split."""
        if max_heads < 0 or random_trials < 0 or n_boot < 1:
            raise ValueError(
                f"max_heads and random_trials must be >= 0 and n_boot >= 1, got "
                f"{max_heads}, {random_trials}, {n_boot}."
            )
        ranked = self.ranked_heads()
        order = [head for head, _ in ranked]

        def val_worst_group(heads: list[tuple[int, int]]) -> float:
            accuracies = group_accuracy(
                self.predictions(self.val, heads_of(heads)), self.val.y, self.val.group
            )
            return min(accuracies.values())

        n_chosen, val_scores = choose_head_count(
            order, val_worst_group, range(0, min(max_heads, len(order)) + 1)
        )
        chosen = order[:n_chosen]
        extra = attention_layers(l for l in range(self.n_layers) if l not in self.search_layers) + all_mlps(
            self.n_layers
        )
        random_reports = (
            [
                self.report(heads_of(heads), n_boot=n_boot)
                for heads in random_head_sets(order, n_chosen, random_trials, seed)
            ]
            if n_chosen
            else []
        )
        rows = {"base": self.report(n_boot=n_boot)}
        if random_reports:
            rows[f"random heads ({n_chosen}), best of {random_trials}"] = max(
                random_reports, key=lambda r: r.worst_group
            )
        rows["chosen heads"] = self.report(heads_of(chosen), n_boot=n_boot)
        rows["chosen heads, authors' 'ablated' condition"] = self.report(
            heads_of(chosen) + extra, n_boot=n_boot
        )
        rows["authors' condition without the heads"] = self.report(extra, n_boot=n_boot)
        if self.authors_heads:
            rows["authors' heads"] = self.report(heads_of(self.authors_heads), n_boot=n_boot)
            rows["authors' heads, 'ablated' condition"] = self.report(
                heads_of(self.authors_heads) + extra, n_boot=n_boot
            )
        return SpuriousComparison(ranked, val_scores, chosen, rows, random_reports)

    def signal(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """:func:`cue_and_label_signal` of every component on the test split, along the logit difference."""
        direction = self.classifier[:, 1] - self.classifier[:, 0]
        return cue_and_label_signal(self.test.parts, direction, self.test.y, self.test.place)


def spurious_task(
    bundle: ClipBundle,
    dataset: str | Path = "toy",
    *,
    n_test: int = 800,
    n_val: int = 400,
    last_k: int = 4,
    cache_dir: str | Path = "caches",
    batch_size: int = 64,
    progress: bool = False,
) -> SpuriousTask:
    """The spurious-cue experiment on the toy world (``"toy"``) or a Waterbirds folder (its path).

    Toy world: label round vs angular, cue cold vs warm background; ``n_test`` and ``n_val`` balanced
    images (a quarter per group) from two held-out seeds; the concept is one zero-shot class embedding
    per background texture. Waterbirds: its whole ``val`` and ``test`` splits (``n_test``/``n_val``
    ignored), classes "landbird"/"waterbird" with the 80 OpenAI templates, concept spanned by place
    names, and the authors' head list for the architecture. Both splits are decomposed into
    resumable caches under ``cache_dir`` with head detail in the last ``last_k`` layers.
    """
    from .cache import DecompositionCache
    from .datasets import ToyDataset, WaterbirdsDataset, load_rgb
    from .evaluation import cache_folder
    from .toy import world

    for name, value, low in (
        ("n_test", n_test, 4),
        ("n_val", n_val, 4),
        ("last_k", last_k, 1),
        ("batch_size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    n_layers = bundle.n_layers
    search_layers = list(range(n_layers - min(last_k, n_layers), n_layers))
    toy = str(dataset) == "toy"
    if toy:
        data = {
            "val": ToyDataset(n_val, 6061, bundle.preprocess, split="test_groups"),
            "test": ToyDataset(n_test, 6060, bundle.preprocess, split="test_groups"),
        }
        class_names, templates = world.ATTRIBUTES["label"], world.prompt_templates("label")
        group_names = world.group_names()
        concept = zero_shot_classifier(
            bundle, world.ATTRIBUTES["background"], world.prompt_templates("background")
        ).T
    else:
        data = {
            split: WaterbirdsDataset(dataset, bundle.preprocess, split=split, progress=progress)
            for split in ("val", "test")
        }
        class_names, templates = WaterbirdsDataset.class_names, OPENAI_IMAGENET_TEMPLATES
        group_names = WaterbirdsDataset.group_names
        concept = zero_shot_classifier(
            bundle, WATERBIRDS_PLACES, ["a photo of the {}.", "a landscape of the {}.", "the {}."]
        ).T
    splits = {}
    for split, images in data.items():
        folder = cache_folder(cache_dir, f"spurious-{split}", bundle, images, search_layers)
        cache = DecompositionCache.build(
            bundle, images, folder, layers=search_layers, batch_size=batch_size, progress=progress
        )
        labels = cache.labels
        y = torch.as_tensor(np.asarray(labels["label" if toy else "y"]))
        group = torch.as_tensor(np.asarray(labels["group"]))
        splits[split] = SpuriousSplit(cache.to_decomposition(), y, group)
    classifier = zero_shot_classifier(bundle, class_names, templates).cpu()
    return SpuriousTask(
        "toy" if toy else "waterbirds",
        list(class_names),
        list(group_names),
        classifier,
        concept.cpu(),
        splits["val"],
        splits["test"],
        n_layers,
        search_layers,
        None if toy else AUTHORS_HEADS.get(bundle.spec.split("/")[0]),
        data["test"].samples.images[:8]
        if toy
        else [np.asarray(load_rgb(path)) for path in _first(data["test"])],
        "toy" if toy else "descriptions",
    )


def _first(images, n: int = 8) -> list[Path]:
    """Paths of a file dataset's first ``n`` images."""
    return [images.root / rel for rel in images.relpaths[:n]]
