"""Chapter 10's studies of neurons' second-order effects, toy world and real images behind the same calls.

The maths (effects, statistics, sparse text codes, the segmentation method) is in
:mod:`clipdecomp.second_order` and :mod:`clipdecomp.sparse_texts`; here are the measurements the
chapter reports. The studies that need ground truth (which attribute drives a neuron, whether a
concept text names the image, adversarial words on generated images) run on the toy world; on real
images they say so, and their prose values read "n/a", so one chapter serves both.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from . import second_order as so
from . import sparse_texts
from .evaluation import EvaluationSet
from .loading import ClipBundle, load
from .sparse_texts import SparseCodes
from .toy import world
from .toy.groundtruth import ROLE_ATTRIBUTES, named_attribute, random_twin, toy_samples, variance_explained

__all__ = [
    "NO_TRUTH",
    "top_share",
    "random_twin_of",
    "layer_sweep",
    "NeuronTruth",
    "neuron_truth",
    "AdversarialWords",
    "adversarial_words",
    "DiscoveredConcepts",
    "discover_concepts",
]

NO_TRUTH = "n/a (toy world only: real images have no ground truth)"


def top_share(projections: torch.Tensor, share: float = 0.02) -> torch.Tensor:
    """Per neuron ([n, K] -> [K]): the part of ``sum x_n^2`` held by its top ``share`` of the images.

    Evenly spread effects give ``share``; a sparse neuron, much more.

    >>> top_share(torch.tensor([[3.0, 1.0], [0.0, 1.0]]), share=0.5).tolist()
    [1.0, 0.5]
    """
    power = projections.double().pow(2).sort(dim=0, descending=True).values
    return (power[: max(1, round(share * len(power)))].sum(0) / power.sum(0)).float()


def random_twin_of(bundle: ClipBundle) -> ClipBundle:
    """``bundle`` with a random-init model of the same architecture (the control of every claim)."""
    spec = bundle.spec
    model = random_twin(spec) if spec == "toy" else load(spec.split("/")[0]).model
    return replace(bundle, model=model.to(bundle.device), spec=f"{spec} (random init)", weights_sha256=None)


def layer_sweep(
    bundle: ClipBundle, fit: EvaluationSet, held: EvaluationSet, batch_size: int = 64
) -> tuple["pd.DataFrame", float]:  # noqa: F821
    """Mean-ablate each MLP layer's second-order effects (every neuron at its mean over ``fit``) on ``held``.

    Returns one row per layer (mean zero-shot accuracy after the ablation, as a fraction, and the mean
    ``1 - cos`` between edited and original embeddings) and the accuracy before any ablation.
    """
    import pandas as pd
    import torch.nn.functional as F

    def effects(images: EvaluationSet) -> tuple[torch.Tensor, torch.Tensor]:  # [n, L, d'], [n, d']
        parts = [so.mlp_effects(bundle, batch.to(bundle.device)) for batch in images.batches(batch_size)]
        return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()

    fit_effects, _ = effects(fit)
    held_effects, original = effects(held)
    rows = {}
    for at in range(bundle.n_layers - 1):
        edited = original - held_effects[:, at] + fit_effects[:, at].mean(0)
        rows[at] = {
            "accuracy, mean-ablated": held.mean_accuracy(edited),
            "embedding change (1 - cos)": (1 - F.cosine_similarity(edited, original)).mean().item(),
        }
    return pd.DataFrame(rows).T.rename_axis("MLP layer"), held.mean_accuracy(original)


@dataclass
class NeuronTruth:
    """Which attribute drives each neuron, and whether its top text is about that attribute.

    Attributes:
        scores: [K, attributes] share of each neuron's projection variance each attribute of
            :data:`~clipdecomp.toy.groundtruth.ROLE_ATTRIBUTES` explains (``None`` without ground truth).
        agree: share of neurons whose top text is about their driving attribute (measured: the attribute
            that explains most of the text's variance over the images); ``chance``: the same for
            independent picks; ``keyword``: the same when the text's words decide.
    """

    scores: torch.Tensor | None
    agree: float | None = None
    chance: float | None = None
    keyword: float | None = None

    def facts(self) -> dict[str, str]:
        """Chapter 10's prose values: agree, chance, keyword, driver_share, driver_verdict."""
        if self.scores is None:
            return dict.fromkeys(("agree", "chance", "keyword", "driver_share", "driver_verdict"), NO_TRUTH)
        median = float(self.scores.max(1).values.median())
        verdict = (
            "most neurons mix several attributes"
            if median < 0.5
            else "most neurons are dominated by one attribute"
        )
        return {
            "agree": f"{self.agree:.0%}",
            "chance": f"{self.chance:.0%}",
            "keyword": f"{self.keyword:.0%}",
            "driver_share": f"{median:.0%}",
            "driver_verdict": verdict,
        }

    def table(self, codes: SparseCodes, pool: Sequence[str], energy: np.ndarray, layer: int, n: int = 6):
        """``n`` neurons of ``layer`` with their top texts (a captioned Styler): those with the clearest
        ground truth, with their driving attribute, or without ground truth those with the largest
        effects (``energy``)."""
        import pandas as pd

        def described(neuron: int, k: int) -> str:
            return "; ".join(f"{text} ({c:+.3f})" for text, c in codes.texts(pool, neuron, k))

        if self.scores is None:
            chosen = np.argsort(energy)[::-1][:n].tolist()
            rows = {f"neuron {i}": {"top texts (coefficient)": described(i, 5)} for i in chosen}
            what = "largest effects"
            return pd.DataFrame(rows).T.style.set_caption(f"Layer {layer}: the {n} neurons with the {what}")
        best = self.scores.max(1).values
        rows = {
            f"neuron {i}": {
                "driving attribute": ROLE_ATTRIBUTES[int(self.scores[i].argmax())],
                "share explained": f"{best[i]:.2f}",
                "top texts (coefficient)": described(i, 3),
            }
            for i in best.argsort(descending=True)[:n].tolist()
        }
        caption = f"Layer {layer}: the {n} neurons with the clearest truth"
        return pd.DataFrame(rows).T.style.set_caption(caption)


def neuron_truth(
    images: EvaluationSet,
    evaluation: so.LayerEvaluation,
    codes: SparseCodes,
    pool: Sequence[str],
    pool_embeddings: torch.Tensor,
) -> NeuronTruth:
    """Score a layer's neurons (``evaluation`` on ``images``) and their top texts against the ground truth."""
    if toy_samples(images) is None:
        return NeuronTruth(None)
    truth = images.labels()

    def attribute_scores(values: torch.Tensor) -> torch.Tensor:  # [n, K] -> [K, attributes]
        return torch.stack([variance_explained(values[..., None], truth[a]) for a in ROLE_ATTRIBUTES], -1)

    scores = attribute_scores(evaluation.projections)
    text_scores = attribute_scores(evaluation.ablations["original"] @ pool_embeddings.T.cpu())
    driver, top_text = scores.argmax(1), codes.top(1)[0][:, 0].cpu()
    named = text_scores.argmax(1)[top_text]  # the measured attribute of each neuron's top text
    chance = sum(
        (driver == a).float().mean() * (named == a).float().mean() for a in range(len(ROLE_ATTRIBUTES))
    )
    words = [named_attribute([pool[t]]) for t in top_text.tolist()]
    keyword = float(np.mean([word == ROLE_ATTRIBUTES[a] for word, a in zip(words, driver)]))
    return NeuronTruth(scores, (named == driver).float().mean().item(), chance.item(), keyword)


@dataclass
class AdversarialWords:
    """Words chosen from the neurons' texts, imposed on images of shape A, against a shape-B reading.

    ``rates``: per ordered shape pair, the share of generated images of A (holding the method's word)
    read as B, for "no word", "neurons (ours)", "similar words" and "random words" (``None``: not run).
    """

    rates: "pd.DataFrame | None"  # noqa: F821
    n_generated: int = 0

    def table(self):
        """The mean over shape pairs of each method's rate (a captioned Styler), or a sentence where the
        study did not run."""
        if self.rates is None:
            return "Adversarial words: " + NO_TRUTH
        caption = f"Mean over {len(self.rates)} ordered shape pairs; 3 words each; {self.n_generated} images"
        return self.rates.mean().to_frame("fooled").T.style.format("{:.1%}").set_caption(caption)

    def facts(self) -> dict[str, str]:
        """fool_ours, fool_random, fool_similar, fool_none, fool_wins."""
        keys = {"neurons (ours)": "fool_ours", "random words": "fool_random", "similar words": "fool_similar"}
        keys["no word"] = "fool_none"
        if self.rates is None:
            return dict.fromkeys([*keys.values(), "fool_wins"], NO_TRUTH)
        means = self.rates.mean()
        facts = {key: f"{means[name]:.1%}" for name, key in keys.items()}
        wins = (
            self.rates["neurons (ours)"] > self.rates[["random words", "similar words"]].max(axis=1)
        ).sum()
        facts["fool_wins"] = f"{wins} of {len(self.rates)}"
        return facts


def adversarial_words(
    bundle: ClipBundle,
    images: EvaluationSet,
    stats: Sequence[so.SecondOrderStats],
    n_generated: int,
    seed: int = 4242,
) -> AdversarialWords:
    """The paper's adversarial-words study on the toy world (shape A read as shape B), 3 words a method.

    Words are the toy world's colour, background, size and position values; "ours" are those the
    neurons most aligned with text(B) - text(A) are made of (sparse codes over the words), against the
    three words nearest text(B) and three random words. Needs toy images (``images``), else not run.
    """
    import pandas as pd

    if toy_samples(images) is None:
        return AdversarialWords(None)
    values = world.ATTRIBUTES
    vocabulary = [(a, i) for a in ("colour", "background", "size", "position") for i in range(len(values[a]))]
    words = [values[a][i] for a, i in vocabulary]
    word_embeddings = bundle.encode_text(words)
    directions = torch.cat([s.tensor("directions", bundle.device) for s in stats])
    word_codes = sparse_texts.omp(directions, sparse_texts.text_dictionary(word_embeddings), 4)
    shape_names = bundle.encode_text(values["shape"])
    generated = world.sample(n_generated, seed=seed, split="uniform")
    seen = torch.cat(
        [
            bundle.encode_image(bundle.preprocess_batch(generated.images[i : i + 256]))
            for i in range(0, len(generated), 256)
        ]
    )

    def fooled(true: int, v: torch.Tensor, word: int | None = None) -> float:
        chosen = generated.attributes["shape"] == true
        if word is not None:
            attribute, value = vocabulary[word]
            chosen = chosen & (generated.attributes[attribute] == value)
        return ((seen[chosen] @ v) > 0).float().mean().item() if chosen.any() else float("nan")

    n_adversarial = max(4, round(0.02 * len(directions)))
    rng, rows = np.random.default_rng(0), {}
    for true, wrong in itertools.permutations(range(len(values["shape"])), 2):
        v = shape_names[wrong] - shape_names[true]
        ours = so.adversarial_words(v, directions, word_codes, n_neurons=n_adversarial, n_words=3)[0]
        picks = {
            "neurons (ours)": ours.tolist(),
            "similar words": (word_embeddings @ shape_names[wrong]).topk(3).indices.tolist(),
            "random words": rng.choice(len(words), 3, replace=False).tolist(),
        }
        rates = {name: np.nanmean([fooled(true, v, j) for j in chosen]) for name, chosen in picks.items()}
        rows[f"{values['shape'][true]} → {values['shape'][wrong]}"] = {"no word": fooled(true, v), **rates}
    return AdversarialWords(pd.DataFrame(rows).T, len(generated))


@dataclass
class DiscoveredConcepts:
    """Each image's top texts by its significant neurons (:func:`~clipdecomp.second_order.discover_concepts`).

    ``found``: [n, k] pool indices per image; ``hits``: share of those texts naming one of the image's
    attribute values; ``chance``: the same for texts drawn at random (both ``None`` without ground truth).
    """

    found: torch.Tensor
    hits: float | None = None
    chance: float | None = None

    def facts(self) -> dict[str, str]:
        """concept_hits, concept_chance."""
        if self.hits is None:
            return dict.fromkeys(("concept_hits", "concept_chance"), NO_TRUTH)
        return {"concept_hits": f"{self.hits:.0%}", "concept_chance": f"{self.chance:.0%}"}


def discover_concepts(
    bundle: ClipBundle,
    images: EvaluationSet,
    layer: int,
    stats: so.SecondOrderStats,
    codes: SparseCodes,
    pool: Sequence[str],
    k: int = 5,
    batch_size: int = 64,
) -> DiscoveredConcepts:
    """The ``k`` texts of each image's significant neurons in ``layer``, scored where there is truth."""
    found = []
    for batch in images.batches(batch_size):
        result = so.second_order(bundle, batch.to(bundle.device), layer)
        found.append(so.discover_concepts(result, stats, codes, k=k)[0].cpu())
    found = torch.cat(found)
    samples = toy_samples(images)
    if samples is None:
        return DiscoveredConcepts(found)
    described = [samples.describe(int(i)) for i in images.indices]

    def names_image(text: str, description: dict[str, str]) -> bool:
        return any(re.search(rf"\b{re.escape(description[a])}\b", text) for a in ROLE_ATTRIBUTES)

    hits = np.mean([names_image(pool[j], d) for row, d in zip(found.tolist(), described) for j in row])
    chance = np.mean([names_image(t, d) for d in described[:50] for t in pool])
    return DiscoveredConcepts(found, float(hits), float(chance))
