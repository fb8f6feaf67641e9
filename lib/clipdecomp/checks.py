"""Argument checks shared by the public functions: a wrong value is refused with the accepted range.

Nothing is ever clamped, rounded, defaulted or ignored: ``2.0`` is not the integer ``2``, ``True`` is
not ``1``, ``"12"`` is not the list ``[1, 2]``, and an empty selection is not "everything".

    >>> check_int("batch_size", 0, minimum=1)
    Traceback (most recent call last):
    ValueError: batch_size must be an integer >= 1, got 0.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["check_int", "check_choice", "check_texts_list", "read_utf8"]


def _accepted(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer in {minimum}..{maximum}"
    if minimum is not None:
        return f"an integer >= {minimum}"
    return "an integer" if maximum is None else f"an integer <= {maximum}"


def check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool or float) within ``minimum..maximum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be {_accepted(minimum, maximum)}, got {value!r} ({type(value).__name__})."
        )
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {_accepted(minimum, maximum)}, got {value}.")
    return int(value)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices`` (compared exactly, no case folding)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def check_texts_list(name: str, value: object) -> list[str]:
    """A list of strings; a bare string (which would iterate as its characters) is refused."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{name} must be a list of strings, got {type(value).__name__} {value!r:.60}: "
            "wrap a single name in a list."
        )
    items = list(value)
    wrong = [item for item in items if not isinstance(item, str)]
    if wrong:
        raise TypeError(f"{name} must hold only strings; got {wrong[:3]!r}.")
    return items


def read_utf8(path: str | Path, what: str = "text file") -> str:
    """The text of a UTF-8 file; a bad byte is reported with the file, line and column."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(
            f"The {what} {path} is not UTF-8: line {line}, column {column} holds the byte "
            f"0x{raw[error.start]:02x} ({error.reason}). Save the file as UTF-8 and try again."
        ) from None
