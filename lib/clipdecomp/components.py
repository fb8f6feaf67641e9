"""The one grammar for naming a component of a decomposition; every module that names parts uses it.

=============  ===================================================  ==========================
label          component                                            emitted by
=============  ===================================================  ==========================
``embed``      the CLS token's embedding term                       every ``stack``
``attn_3``     attention layer 3, all heads and tokens              ``stack("layer")``, others
``mlp_3``      MLP 3                                                every ``stack``
``L3H1``       head 1 of layer 3 (all tokens)                       ``stack("head")``
``L3H1T5``     head 1 of layer 3, key token 5 (0 is CLS)            ``stack("patch")``
``cls_3``      the CLS-attends-to-CLS terms of layer 3, all heads   (ablation studies)
``pool_mlp``   an attention pool's MLP (SigLIP)                     ``stack`` of pooled towers
=============  ===================================================  ==========================

Layers, heads and tokens are non-negative and checked against the model: ``L0H-1`` or ``L9H0`` on a
6-layer model is an error naming the valid range, never the last head by Python's negative indexing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["Component", "parse_label"]

Kind = Literal["embed", "attn", "mlp", "cls", "head", "token", "pool_mlp"]

_GRAMMAR = re.compile(
    r"^(?:(?P<simple>embed|pool_mlp)|(?P<kind>attn|mlp|cls)_(?P<layer>-?\d+)"
    r"|L(?P<hl>-?\d+)H(?P<head>-?\d+)(?:T(?P<token>-?\d+))?)$"
)
_FORMS = "'embed', 'attn_3', 'mlp_3', 'cls_3', 'L3H1', 'L3H1T5' or 'pool_mlp'"


@dataclass(frozen=True)
class Component:
    """A parsed label: its kind and the layer, head and token it names (``None`` where not applicable)."""

    kind: Kind
    layer: int | None = None
    head: int | None = None
    token: int | None = None

    def __str__(self) -> str:
        if self.kind in ("embed", "pool_mlp"):
            return self.kind
        if self.kind in ("attn", "mlp", "cls"):
            return f"{self.kind}_{self.layer}"
        return f"L{self.layer}H{self.head}" + (f"T{self.token}" if self.kind == "token" else "")


def parse_label(
    label: str, n_layers: int | None = None, n_heads: int | None = None, n_tokens: int | None = None
) -> Component:
    """Parse ``label`` and check its indices against the model's sizes (those given).

    Raises:
        TypeError: ``label`` is not a string.
        ValueError: the label does not follow the grammar.
        IndexError: a layer, head or token is negative or out of range.
    """
    if not isinstance(label, str):
        raise TypeError(f"A component label is a string such as 'L3H1', got {label!r}.")
    match = _GRAMMAR.match(label)
    if not match:
        raise ValueError(f"Unknown component {label!r}: labels look like {_FORMS}.")
    if match["simple"]:
        return Component(match["simple"])
    if match["kind"]:
        component = Component(match["kind"], int(match["layer"]))
    else:
        token = None if match["token"] is None else int(match["token"])
        component = Component(
            "head" if token is None else "token", int(match["hl"]), int(match["head"]), token
        )
    for name, value, size in (
        ("layer", component.layer, n_layers),
        ("head", component.head, n_heads),
        ("token", component.token, n_tokens),
    ):
        if value is None:
            continue
        if value < 0 or (size is not None and value >= size):
            valid = (
                f"the model has {size} {name}s, valid 0..{size - 1}"
                if size is not None
                else "valid: 0 or more"
            )
            raise IndexError(f"{label}: {name} {value} is out of range ({valid}).")
    return component
