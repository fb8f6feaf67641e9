"""Doctests: every docstring example in lib/clipdecomp runs on the shipped toy model.

Examples may use ``clipdecomp``, ``torch``, ``np``, ``bundle`` (``clipdecomp.load("toy")``), ``images``
(a preprocessed batch of 4 toy images), ``parts`` (their decomposition with head detail) and ``tmp_path``
(a fresh folder).

Also loads the nbval rerun plugin (``clipdecomp.book.rerun``, active only under ``--nbval``), so that
``pytest --nbval _build/src/notebooks`` from the repository root checks a rerun of the book.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest_plugins = ["clipdecomp.book.rerun"]


@pytest.fixture(autouse=True)
def _doctest_names(request, doctest_namespace, tmp_path):
    if not isinstance(request.node, pytest.DoctestItem):
        return
    import clipdecomp
    from clipdecomp import toy

    torch.manual_seed(0)
    bundle = clipdecomp.load("toy")
    images = bundle.preprocess_batch(toy.sample(4, seed=1, split="uniform").images)
    doctest_namespace.update(
        clipdecomp=clipdecomp,
        torch=torch,
        np=np,
        bundle=bundle,
        images=images,
        parts=clipdecomp.decompose(bundle, images),
        tmp_path=tmp_path,
    )
