"""Mean-ablation of direct contributions, on a cached decomposition and as a real intervention.

Components are named by the decomposition's labels: ``"embed"``, ``"mlp_3"``, ``"attn_3"`` (a whole
attention layer), ``"L3H1"`` (one head) and ``"cls_3"`` (the CLS-attends-to-CLS terms of layer 3,
all heads). Mean-ablating a component replaces it by its mean over the evaluated images.

* :func:`mean_ablate` edits the cached sum of direct terms (the paper's method): no network run,
  final LayerNorm frozen, indirect effects ignored.
* :func:`intervene` re-runs the network with the component replaced by its dataset mean *inside* the
  forward pass (every token position), so later layers and the final LayerNorm see the change. The
  gap between the two measures how much the frozen-LayerNorm, direct-effect view moves a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .components import parse_label
from .decomposition import Decomposition
from .loading import ClipBundle
from .towers import Tower, attention, vision_tower

__all__ = [
    "mean_ablate",
    "intervene",
    "all_mlps",
    "attention_layers",
    "cls_terms",
    "heads_of",
    "paper_ablations",
    "ablation_study",
    "cumulative_sweep",
    "first_drop",
]


def all_mlps(n_layers: int, with_embedding: bool = True) -> list[str]:
    """Every MLP (and, as in the paper's "MLPs" row, the CLS embedding term)."""
    return (["embed"] if with_embedding else []) + [f"mlp_{l}" for l in range(n_layers)]


def attention_layers(layers: Iterable[int]) -> list[str]:
    """Whole attention layers, e.g. ``attention_layers(range(8))`` for the cumulative sweep."""
    return [f"attn_{l}" for l in layers]


def cls_terms(n_layers: int) -> list[str]:
    """The CLS-to-CLS attention terms of every layer."""
    return [f"cls_{l}" for l in range(n_layers)]


def heads_of(pairs: Iterable[tuple[int, int]]) -> list[str]:
    """Labels for (layer, head) pairs, e.g. the authors' Waterbirds head lists."""
    return [f"L{l}H{h}" for l, h in pairs]


def _parse(
    labels: Sequence[str], n_layers: int, n_heads: int, n_tokens: int | None = None
) -> list[tuple[str, int, int, int]]:
    """Validate labels (the :mod:`~clipdecomp.components` grammar) into (kind, layer, head, token)."""
    parsed = []
    for label in labels:
        c = parse_label(label, n_layers, n_heads, n_tokens)
        if c.kind == "pool_mlp":
            raise ValueError(
                f"{label}: the attention pool's MLP is part of the readout; mean-ablation covers the "
                "trunk's components (embed, attn_L, mlp_L, cls_L, LxHy, LxHyTz)."
            )
        parsed.append((c.kind, c.layer or 0, c.head or 0, c.token or 0))
    return parsed


_NO_CLS = (
    "cls_L components are the CLS-attends-to-CLS terms, and this tower has no CLS token "
    "(its attention pool reads every token): ablate heads or layers instead."
)


def _part(parts: Decomposition, kind: str, layer: int, head: int, token: int) -> torch.Tensor:
    if kind == "embed":
        return parts.embedding
    if kind == "mlp":
        return parts.mlps[:, layer]
    if kind == "attn":
        return parts.attns[:, layer]
    if kind == "cls":
        if parts.readout != "cls":
            raise ValueError(_NO_CLS)
        return parts.cls_to_cls[:, layer].sum(1)
    if layer not in parts.head_layers:
        raise ValueError(
            f"L{layer}H{head}: layer {layer} has no head detail; decompose with layers including {layer}."
        )
    if kind == "token":
        if not parts.spatial:
            raise ValueError(
                f"L{layer}H{head}T{token}: per-token components need decompose(..., spatial=True)."
            )
        return parts.heads[:, parts.head_layers.index(layer), token, head]
    return parts.head_terms()[:, parts.head_layers.index(layer), head]


def mean_ablate(
    parts: Decomposition, ablate: Sequence[str], means: Decomposition | None = None
) -> torch.Tensor:
    """[B, d'] embeddings with the named components replaced by their mean (frozen LayerNorm).

    ``means`` is the decomposition the means are taken over (default: ``parts`` itself). The result
    is not renormalised: zero-shot argmax does not depend on an image embedding's norm. Overlapping
    components (a head and its whole layer) are each subtracted once, so avoid listing both.
    """
    means = parts if means is None else means
    total = parts.total().clone()
    n_tokens = parts.heads.shape[2] if parts.spatial else None
    for component in _parse(list(dict.fromkeys(ablate)), parts.n_layers, parts.n_heads, n_tokens):
        total += _part(means, *component).mean(0) - _part(parts, *component)
    return total


@dataclass(frozen=True)
class _Target:
    """A component that :func:`intervene` mean-ablates, as seen from the module whose output holds it.

    ``read(output, u)`` gives the component [B, ...] from that output and the block's attention input
    ``u``; ``shift(output, delta)`` returns the output with the component moved by ``delta`` (its mean
    minus its value, for every image).
    """

    key: str
    module: nn.Module
    read: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    shift: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    layer: int | None = None  # the block whose attention input ``read`` needs (None: not needed)


def _whole_output(key: str, module: nn.Module, positions: slice) -> _Target:
    """A module's entire output at ``positions`` (token axis 1): an MLP, an attention layer, the embedding."""

    def shift(out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, positions] += delta
        return out

    return _Target(key, module, read=lambda out, u: out[:, positions], shift=shift)


def _heads_target(tower: Tower, layer: int, heads: list[int]) -> _Target:
    """Some heads of a layer at every query: their outputs before the out-projection [B, N, H', Dh]."""
    block = tower.blocks[layer]
    return _Target(
        f"heads{layer}",
        block.attn_write,
        layer=layer,
        read=lambda out, u: attention(block.weights(), u, heads)[0],
        shift=lambda out, delta: out + block.weights().write(delta, heads, bias=False),
    )


def _cls_target(tower: Tower, layer: int) -> _Target:
    """What every head of a layer writes at the CLS query from the CLS key: alpha_00 * v_0 [B, 1, H, Dh]."""
    block = tower.blocks[layer]

    def read(out: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        weights = block.weights()
        _, probs = attention(weights, u)
        cls_value = weights.split(u[:, :1] @ weights.v.T + weights.v_bias)  # [B, 1, H, Dh]
        return probs[:, :, 0, 0][:, None, :, None] * cls_value

    def shift(out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, :1] += block.weights().write(delta, bias=False)
        return out

    return _Target(f"cls{layer}", block.attn_write, read=read, shift=shift, layer=layer)


def _targets(tower: Tower, parsed: list[tuple[str, int, int, int]]) -> list[_Target]:
    """One target per whole component in the order given, then per layer its heads and its CLS terms.

    The embedding is ablated where the readout reads it directly: the CLS token, or every token of an
    attention-pool tower.
    """
    if not tower.has_cls and any(kind == "cls" for kind, *_ in parsed):
        raise ValueError(_NO_CLS)
    targets = []
    for kind, layer, *_ in parsed:
        if kind == "embed":
            targets.append(_whole_output("embed", tower.embed, slice(0, 1) if tower.has_cls else slice(None)))
        elif kind in ("mlp", "attn"):
            block = tower.blocks[layer]
            module = block.mlp_write if kind == "mlp" else block.attn_write
            targets.append(_whole_output(f"{kind}{layer}", module, slice(None)))
    heads: dict[int, list[int]] = {}
    for kind, layer, head, _ in parsed:
        if kind == "head":
            heads.setdefault(layer, []).append(head)
    cls_layers = {layer for kind, layer, *_ in parsed if kind == "cls"}
    for layer in sorted(set(heads) | cls_layers):
        targets += [_heads_target(tower, layer, heads[layer])] if layer in heads else []
        targets += [_cls_target(tower, layer)] if layer in cls_layers else []
    return targets


OnTarget = Callable[[_Target, torch.Tensor, torch.Tensor | None], torch.Tensor | None]


def _hooked_run(
    tower: Tower, targets: list[_Target], batches: Iterable[torch.Tensor], on_target: OnTarget
) -> list[torch.Tensor]:
    """Normalised embeddings of ``batches`` with ``on_target(target, output, u)`` hooked on every target.

    A non-None return value replaces the module's output; ``u`` is the attention input of the target's
    block (recorded by a hook on that block's attention input).
    """
    inputs: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in sorted({t.layer for t in targets if t.layer is not None}):
        hooks.append(
            tower.blocks[layer].attn_input.register_forward_hook(
                lambda module, args, out, layer=layer: inputs.__setitem__(layer, out)
            )
        )
    for target in targets:
        hooks.append(
            target.module.register_forward_hook(
                lambda module, args, out, target=target: on_target(target, out, inputs.get(target.layer))
            )
        )
    try:
        return [F.normalize(tower.features(tower.check_images(batch)).float(), dim=-1) for batch in batches]
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def intervene(
    bundle: ClipBundle | torch.nn.Module,
    batches: Iterable[torch.Tensor] | torch.Tensor,
    ablate: Sequence[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """[n, d'] normalised embeddings with the components mean-ablated inside the forward pass.

    Two passes over ``batches`` (a [n, 3, H, W] tensor, or a re-iterable of image batches such as a
    ``DataLoader``, read lazily): the first records each component's mean output at every token
    position on the clean model, the second re-runs the model with those means substituted.
    """
    tower = vision_tower(bundle)
    parsed = _parse(list(dict.fromkeys(ablate)), tower.n_layers, tower.n_heads)
    if any(kind == "token" for kind, *_ in parsed):
        raise ValueError(
            "intervene ablates whole heads, layers and CLS terms; per-token components (LxHyTz) can "
            "only be mean-ablated on a spatial decomposition (mean_ablate)."
        )
    if isinstance(batches, torch.Tensor):
        batches = batches.split(batch_size)
    elif isinstance(batches, Iterator):
        raise TypeError(
            "intervene reads the batches twice: pass a tensor, a list or a DataLoader, not a one-shot "
            "iterator or generator."
        )
    targets = _targets(tower, parsed)
    sums: dict[str, torch.Tensor] = {}

    def record(target: _Target, out: torch.Tensor, u: torch.Tensor | None) -> None:
        sums[target.key] = sums.get(target.key, 0) + target.read(out, u).float().sum(0)

    def substitute(target: _Target, out: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        value = target.read(out, u)
        return target.shift(out, means[target.key].to(value.dtype) - value)

    count = sum(len(batch) for batch in _hooked_run(tower, targets, batches, record))
    means = {key: total / count for key, total in sums.items()}
    return torch.cat(_hooked_run(tower, targets, batches, substitute))


def paper_ablations(n_layers: int, last_k: int = 4) -> dict[str, list[str]]:
    """The paper's ablation rows (Table 1 and Fig. 3): name -> components, baseline first."""
    if not 1 <= last_k <= n_layers:
        raise ValueError(f"last_k must lie in 1..{n_layers} (the model's layers), got {last_k!r}.")
    early = n_layers - last_k
    return {
        "baseline": [],
        "all MLPs (+ CLS embedding)": all_mlps(n_layers),
        "CLS-to-CLS attention terms": cls_terms(n_layers),
        f"attention layers 0..{early - 1} (all but the last {last_k})": attention_layers(range(early)),
        f"the last {last_k} attention layers": attention_layers(range(early, n_layers)),
    }


def ablation_study(
    parts: Decomposition,
    score: Callable[[torch.Tensor], dict[str, float]],
    rows: dict[str, list[str]],
    bundle: ClipBundle | None = None,
    batches: Iterable[torch.Tensor] | None = None,
) -> "pd.DataFrame":  # noqa: F821
    """Per row and task: accuracy after mean-ablation on the cached decomposition, and (with ``bundle``
    and ``batches``, the same images) after the real intervention, with their gap; fractions.

    ``score`` maps [n, d'] embeddings to ``{task: accuracy}`` (e.g. ``EvaluationSet.accuracies``).
    """
    import pandas as pd

    records = []
    for name, components in rows.items():
        cached = score(mean_ablate(parts, components))
        real = score(intervene(bundle, batches, components)) if components and bundle is not None else cached
        records += [
            {
                "ablation": name,
                "task": task,
                "cached": cached[task],
                "real": real[task],
                "gap (real - cached)": real[task] - cached[task],
            }
            for task in cached
        ]
    return pd.DataFrame(records)


def cumulative_sweep(
    parts: Decomposition,
    score: Callable[[torch.Tensor], dict[str, float]],
    bundle: ClipBundle | None = None,
    batches: Iterable[torch.Tensor] | None = None,
) -> "pd.DataFrame":  # noqa: F821
    """Accuracy per task after mean-ablating attention layers ``0..l``, for every ``l``: one row per ``l``,
    columns ``"{task} (cached)"`` and, with ``bundle`` and ``batches``, ``"{task} (real)"``."""
    import pandas as pd

    sweep = []
    for upto in range(parts.n_layers):
        components = attention_layers(range(upto + 1))
        row = {f"{t} (cached)": v for t, v in score(mean_ablate(parts, components)).items()}
        if bundle is not None:
            row.update({f"{t} (real)": v for t, v in score(intervene(bundle, batches, components)).items()})
        sweep.append(row)
    return pd.DataFrame(sweep, index=pd.Index(range(parts.n_layers), name="up to layer"))


def first_drop(
    sweep: "pd.DataFrame",  # noqa: F821
    baseline: dict[str, float],
    share: float = 0.9,
) -> dict[str, int | None]:
    """Per task: the first ``l`` of a :func:`cumulative_sweep` whose cached accuracy is below ``share`` of
    the task's ``baseline`` accuracy (``None``: never), i.e. how early the task starts to depend on layers.

    >>> import pandas as pd
    >>> sweep = pd.DataFrame({"shape (cached)": [0.9, 0.85, 0.4], "colour (cached)": [1.0, 1.0, 0.95]})
    >>> first_drop(sweep, {"shape": 0.9, "colour": 1.0})
    {'shape': 2, 'colour': None}
    """
    return {
        task: next((int(l) for l in sweep.index if sweep.loc[l, f"{task} (cached)"] < share * value), None)
        for task, value in baseline.items()
    }
