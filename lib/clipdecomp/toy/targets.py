"""The toy model's targets (what each chapter must be able to show on it), measured and recorded in its card.

    python -m clipdecomp.toy.targets              # measure data/toy's model, write card["targets"]

Each row names what is measured, the target, the measured value and whether it is met. Every
measurement is one of the book's own experiments, on fresh held-out images:

* zero-shot accuracy on the uncorrelated split (the card's ``zero_shot_accuracy``);
* the spurious task (chapter 6, :func:`clipdecomp.spurious.spurious_task`): the base worst group, the
  gain of the heads chosen on validation, against the best and the mean of 5 random sets of that size;
* specialised heads in the last 3 layers (chapter 3, :mod:`clipdecomp.toy.groundtruth`): a head with
  a clear role per attribute, and how often TEXT SPAN's first texts name that role;
* layer structure (chapter 2): accuracy lost when mean-ablating all MLPs (with the embedding term),
  all attention layers but the last 3, and the last 3;
* retrieval (chapter 4): the shape head's neighbours sharing the query's shape, over chance;
* segmentation (chapter 7): object coverage, the constant map's rank, and the decomposition against
  raw attention, Grad-CAM and Chefer et al. on mIoU and foreground AP.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from ..loading import ClipBundle, load, toy_card, toy_model_dir

__all__ = ["measure_targets", "main"]

ZERO_SHOT = {"shape": 0.90, "colour": 0.97, "position": 0.95, "background": 0.97}


def _row(what: str, target: str, measured: str, met: bool) -> dict:
    return {"what": what, "target": target, "measured": measured, "met": bool(met)}


def _spurious(bundle: ClipBundle, cache: Path, n_test: int, n_val: int) -> list[dict]:
    from ..spurious import spurious_task

    task = spurious_task(bundle, "toy", n_test=n_test, n_val=n_val, last_k=4, cache_dir=cache)
    result = task.compare(max_heads=8, random_trials=5, n_boot=200)
    gains = result.gains()
    size = len(result.chosen)
    return [
        _row(
            "spurious task: base worst group",
            "≤ 50%",
            f"{result.base.worst_group:.1%}",
            result.base.worst_group <= 0.5,
        ),
        _row(
            f"spurious task: worst-group gain of the {size} heads chosen on validation",
            "≥ +25 points",
            f"{100 * gains['chosen']:+.1f} points",
            gains["chosen"] >= 0.25,
        ),
        _row(
            f"spurious task: chosen heads vs the best of 5 random sets of {size}",
            "higher",
            f"{result.chosen_report.worst_group:.1%} vs {result.best_random.worst_group:.1%}",
            size > 0 and result.chosen_report.worst_group > result.best_random.worst_group,
        ),
        _row(
            "spurious task: mean random set's gain",
            "≤ half the chosen gain",
            f"{100 * gains['mean random']:+.1f} points",
            size > 0 and gains["mean random"] <= gains["chosen"] / 2,
        ),
    ]


def _heads(bundle: ClipBundle, cache: Path, n_images: int) -> list[dict]:
    from ..evaluation import evaluation_set
    from ..pools import load_pool
    from ..text_span import text_span_heads
    from .groundtruth import text_span_agreement

    layers = list(range(bundle.n_layers - 3, bundle.n_layers))
    images = evaluation_set(bundle, "toy", n_images, seed=9090)
    parts = images.decompose(bundle, cache, layers=layers, progress=False).to_decomposition()
    pool = load_pool("toy")
    spans = text_span_heads(parts, bundle.encode_text(pool), m=3, rank=min(80, bundle.embed_dim))
    agreement = text_span_agreement(bundle, images, parts, spans, pool, first=3)
    roles = agreement.table["role"]
    rows = []
    for attribute in ("shape", "colour", "position", "background"):
        heads = [label for label, role in roles.items() if role == attribute]
        best = float(agreement.scores[attribute].max())
        rows.append(
            _row(
                f"a {attribute} head in the last 3 layers (score ≥ 0.4, ≥ 2× its other attributes)",
                "at least one",
                f"{', '.join(heads) or 'none'} (best {attribute} score {best:.2f})",
                bool(heads),
            )
        )
    share = agreement.agree / agreement.with_role if agreement.with_role else 0.0
    rows.append(
        _row(
            "TEXT SPAN's first 3 texts name the role of the heads that have one",
            "≥ 60%",
            f"{agreement.agree} of {agreement.with_role} ({share:.0%})",
            share >= 0.6,
        )
    )
    return rows


def _layers(bundle: ClipBundle, cache: Path, n_images: int) -> list[dict]:
    from ..ablation import all_mlps, attention_layers, mean_ablate
    from ..evaluation import evaluation_set

    images = evaluation_set(bundle, "toy", n_images, seed=2024)
    parts = images.decompose(bundle, cache, layers=[], progress=False).to_decomposition()
    base = images.mean_accuracy(parts.total())
    n = bundle.n_layers

    def cost(components: list[str]) -> float:
        return base - images.mean_accuracy(mean_ablate(parts, components))

    mlps, early, late = (
        cost(all_mlps(n)),
        cost(attention_layers(range(n - 3))),
        cost(attention_layers(range(n - 3, n))),
    )
    return [
        _row(
            "layer structure: cost of mean-ablating all MLPs and the embedding",
            "≤ 5 points",
            f"{100 * mlps:.1f} points",
            mlps <= 0.05,
        ),
        _row(
            "layer structure: cost of all attention layers but the last 3",
            "≤ 4 points",
            f"{100 * early:.1f} points",
            early <= 0.04,
        ),
        _row(
            "layer structure: cost of the last 3 attention layers",
            "≥ 10 points",
            f"{100 * late:.1f} points",
            late >= 0.10,
        ),
    ]


def _retrieval(bundle: ClipBundle, n_images: int) -> list[dict]:
    from ..retrieval import evaluate

    result = evaluate(bundle, "toy", n_images)
    summary = result.summary()
    own, chance = float(summary.loc["shape", "own"]), float(summary.loc["shape", "chance"])
    return [
        _row(
            f"retrieval: the shape head ({summary.loc['shape', 'head']}) shares the query's shape",
            "≥ 3× chance",
            f"{own:.1%} vs chance {chance:.1%} ({own / chance:.1f}×)",
            own >= 3 * chance,
        )
    ]


def _segmentation(bundle: ClipBundle, n_images: int) -> list[dict]:
    from ..segmentation import METHODS
    from ..segmentation_eval import REFERENCE, compare, segmentation_set
    from . import world

    coverage = float(world.sample(2000, 777, split="uniform").masks.mean())
    result = compare(METHODS, bundle, segmentation_set(bundle, "toy", n_images=n_images))
    table = result.table()
    rank = int((table["mIoU"] > table.loc[REFERENCE, "mIoU"]).sum()) + 1
    others = ["raw attention", "Grad-CAM", "Chefer et al."]
    beats = [
        m
        for m in others
        if all(table.loc["decomposition", k] > table.loc[m, k] for k in ("mIoU", "fg AP (extra)"))
    ]
    return [
        _row("segmentation: pixels covered by objects", "≥ 12%", f"{coverage:.1%}", coverage >= 0.12),
        _row(
            "segmentation: rank of the constant map by mIoU",
            f"not near the top (of {len(table)})",
            f"{rank} of {len(table)}",
            rank >= len(table) - 1,
        ),
        _row(
            "segmentation: decomposition beats raw attention, Grad-CAM, Chefer et al. (mIoU and fg AP)",
            "all three",
            f"beats {', '.join(beats) or 'none'}",
            len(beats) == len(others),
        ),
    ]


def measure_targets(
    bundle: ClipBundle,
    card: dict,
    n_images: int = 1000,
    n_test: int = 800,
    n_val: int = 400,
    n_segmentation: int = 200,
) -> list[dict]:
    """Every target row for ``bundle``; ``card["zero_shot_accuracy"]`` supplies the zero-shot rows."""
    accuracy = card["zero_shot_accuracy"]
    rows = [
        _row(
            f"zero-shot {task}, uncorrelated split",
            f"≥ {target:.0%}",
            f"{accuracy[task]:.1%}",
            accuracy[task] >= target,
        )
        for task, target in ZERO_SHOT.items()
    ]
    with tempfile.TemporaryDirectory() as cache:
        rows += _spurious(bundle, Path(cache), n_test, n_val)
        rows += _heads(bundle, Path(cache), n_images)
        rows += _layers(bundle, Path(cache), n_images)
    rows += _retrieval(bundle, min(n_images, 600))
    rows += _segmentation(bundle, n_segmentation)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=toy_model_dir(), help="a toy-model folder holding card.json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    card_path = args.model / "card.json"
    card = toy_card(args.model)
    card["targets"] = measure_targets(load(str(args.model) if args.model != toy_model_dir() else "toy"), card)
    card_path.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    for row in card["targets"]:
        print(
            f"{'met ' if row['met'] else 'MISS'}  {row['what']}: {row['measured']} (target {row['target']})"
        )


if __name__ == "__main__":
    main()
