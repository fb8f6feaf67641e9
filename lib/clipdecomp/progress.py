"""Progress bars for the library's long loops: tqdm's, switched off where nobody watches them.

``CLIPDECOMP_PROGRESS=off`` turns every bar off. The book runner sets it while it executes the
chapters, and the nbval rerun check (:mod:`clipdecomp.book.rerun`) sets it for the kernels it starts:
a frozen bar in a static page is noise, and whether a bar appears at all depends on which caches a
previous run left behind, not on any result.

>>> progress_shown(False), progress_shown(True) == (os.environ.get(ENVIRONMENT, "on") != "off")
(False, True)
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator

from tqdm.auto import tqdm

__all__ = ["ENVIRONMENT", "progress_shown", "progress_bar", "progress_off"]

ENVIRONMENT = "CLIPDECOMP_PROGRESS"
"""The environment variable: ``off`` (or ``0``, ``false``, ``no``) hides every progress bar."""


def progress_shown(wanted: bool = True) -> bool:
    """Whether a bar the caller ``wanted`` is shown: not when :data:`ENVIRONMENT` says off."""
    return wanted and os.environ.get(ENVIRONMENT, "on").strip().lower() not in {"off", "0", "false", "no"}


def progress_bar(iterable: Iterable | None = None, *, show: bool = True, **options) -> tqdm:
    """``tqdm(iterable, **options)``, disabled unless :func:`progress_shown` (``show``)."""
    return tqdm(iterable, disable=not progress_shown(show), **options)


@contextmanager
def progress_off() -> Iterator[None]:
    """Hide every bar, in this process and in the kernels it starts, until the block ends."""
    before = os.environ.get(ENVIRONMENT)
    os.environ[ENVIRONMENT] = "off"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENVIRONMENT]
        else:
            os.environ[ENVIRONMENT] = before
