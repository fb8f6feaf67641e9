"""Rerun check: does executing a chapter again give the outputs the book shows?

nbval re-executes an executed notebook cell by cell and compares each cell's new outputs with the
stored ones (``pytest --nbval _build/src/notebooks``). This pytest plugin, loaded by the repository's
``conftest.py`` (elsewhere: ``pytest -p clipdecomp.book.rerun --nbval ...``) and active only under
``--nbval``, adds three things to it:

* the book's one sanitiser file, :data:`SANITIZE_FILE`, unless ``--nbval-sanitize-with`` names another:
  each section names one pattern for output that truly varies between runs (versions, timings, paths);
* images compared too (nbval skips them unless nbdime is in use), by a hash of their decoded pixels,
  so an identical figure re-encoded differently still passes and a changed pixel fails;
* a summary at the end: how many outputs were compared, and how many each named pattern sanitised.

The kernel runs in pytest's own environment (``--nbval-current-env``) unless a kernel is named.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..progress import ENVIRONMENT

__all__ = ["SANITIZE_FILE", "IMAGE_TYPES", "RerunTally", "sanitizers", "image_digest", "summary_line"]

SANITIZE_FILE = Path(__file__).with_name("nbval_sanitize.cfg")
"""The named patterns for outputs that legitimately vary between runs (INI sections: regex, replace)."""

IMAGE_TYPES = ("image/png", "image/jpeg")

_TALLY = pytest.StashKey["RerunTally"]()


def sanitizers(path: Path = SANITIZE_FILE) -> dict[str, tuple[str, str]]:
    """The sanitiser file's patterns by name: ``{section: (regex, replacement)}``, in file order.

    >>> sorted(sanitizers())[:2]
    ['memory addresses', 'paths']
    """
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(Path(path).read_text(encoding="utf-8"))
    patterns = {}
    for name in parser.sections():
        section = parser[name]
        if set(section) != {"regex", "replace"}:
            raise ValueError(f"{path}: section [{name}] must hold exactly 'regex:' and 'replace:' lines.")
        re.compile(section["regex"])  # a broken pattern fails here, naming nothing vaguer than re's error
        patterns[name] = (section["regex"], section["replace"])
    return patterns


def image_digest(encoded: str) -> str:
    """SHA-256 of an image output's decoded pixels (mode, size and RGBA bytes), not of its file bytes.

    >>> from PIL import Image
    >>> png = io.BytesIO(); Image.new("RGB", (2, 1), "red").save(png, "PNG")
    >>> image_digest(base64.b64encode(png.getvalue()).decode())[:12]
    '6f1946136cf0'
    """
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        pixels = image.convert("RGBA")
        return hashlib.sha256(f"{pixels.size}".encode() + pixels.tobytes()).hexdigest()


@dataclass
class RerunTally:
    """What the rerun compared: cells, outputs (text and images), and outputs each pattern sanitised."""

    patterns: dict[str, tuple[str, str]]
    notebooks: set[str] = field(default_factory=set)
    cells: int = 0
    text_outputs: int = 0
    images: int = 0
    sanitised: Counter = field(default_factory=Counter)

    def count(self, notebook: str, outputs: list) -> None:
        """Tally one cell's reference outputs, and the patterns that change each text output."""
        self.notebooks.add(notebook)
        self.cells += 1
        for output in outputs:
            values = output.get("data", {}) if "data" in output else {"text": output.get("text")}
            for mime, value in values.items():
                if mime in IMAGE_TYPES:
                    self.images += 1
                elif isinstance(value, str) and mime != "application/vnd.jupyter.widget-view+json":
                    self.text_outputs += 1
                    for name, (regex, _) in self.patterns.items():
                        if re.search(regex, value):
                            self.sanitised[name] += 1


def summary_line(tally: RerunTally) -> str:
    """One line for the terminal, e.g. ``nbval rerun: 12 notebooks, 96 cells; 140 outputs compared ...``."""
    named = ", ".join(f"{name} {n}" for name, n in sorted(tally.sanitised.items())) or "none"
    return (
        f"nbval rerun: {len(tally.notebooks)} notebooks, {tally.cells} cells; "
        f"{tally.text_outputs + tally.images} outputs compared ({tally.text_outputs} text, {tally.images} "
        f"images by pixel hash); sanitised outputs by pattern: {named}"
    )


def _images(outputs: list) -> list[str]:
    return [o["data"][m] for o in outputs if "data" in o for m in IMAGE_TYPES if m in o["data"]]


def pytest_configure(config: pytest.Config) -> None:
    if not getattr(config.option, "nbval", False) or config.option.nbval_lax:
        return
    from nbval.plugin import IPyNbCell

    if config.option.nbval_sanitize_with is None:
        config.option.nbval_sanitize_with = str(SANITIZE_FILE)
    if config.option.nbval_kernel_name is None:
        config.option.nbval_current_env = True
    os.environ[ENVIRONMENT] = "off"  # as when the book executed the chapters (clipdecomp.progress)
    tally = RerunTally(sanitizers(Path(config.option.nbval_sanitize_with)))
    config.stash[_TALLY] = tally
    compare_text = IPyNbCell.compare_outputs

    def compare_outputs(cell, test, ref, skip_compare=None):
        """nbval's comparison (text, tables, glue), then the images by pixel hash."""
        tally.count(cell.parent.name, ref)
        if not compare_text(cell, test, ref, skip_compare):
            return False
        expected, got = [image_digest(i) for i in _images(ref)], [image_digest(i) for i in _images(test)]
        if expected != got:
            cell.comparison_traceback.append(
                f"images differ: stored {len(expected)} with pixel hashes {[d[:12] for d in expected]}, "
                f"rerun {len(got)} with {[d[:12] for d in got]}"
            )
            return False
        return True

    IPyNbCell.compare_outputs = compare_outputs


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    tally = config.stash.get(_TALLY, None)
    if tally is not None and tally.cells:
        terminalreporter.write_line(summary_line(tally))
