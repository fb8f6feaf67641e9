"""The nbval rerun check (clipdecomp.book.rerun): what it sanitises, what it still catches."""

from __future__ import annotations

import re
import subprocess

import nbformat
import pytest
from clipdecomp.book.rerun import SANITIZE_FILE, sanitizers
from clipdecomp.progress import progress_off
from nbclient import NotebookClient

from conftest import nbval_rerun

CELLS = {
    "steady": [  # varies only where the sanitiser file allows: an address, a version line, a timing
        "print(object())",
        "import torch\nprint(f'clipdecomp 0.1.0 | torch {torch.__version__} | open_clip 3 | python 3 | CPU')",
        "import time\nstart = time.perf_counter()\ntime.sleep(0.01)\n"
        "print(f'{time.perf_counter() - start:.4f} s')",
        "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0]); plt.show()",
    ],
    "random_number": ["import random\nprint(random.random())"],
    "random_image": [  # same text output (the figure's repr), different pixels
        "import matplotlib.pyplot as plt, numpy as np\nplt.imshow(np.random.rand(4, 4)); plt.show()"
    ],
    "progress_bar": [  # the library's bars are off under the check, as when the book was executed
        "from clipdecomp.progress import progress_bar\nfor _ in progress_bar(range(3), desc='work'): pass"
    ],
}


def _executed(folder, name: str, sources: list[str]):
    path = folder / f"{name}.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(notebook, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    nbformat.write(notebook, path)
    return path


@pytest.fixture(scope="module")
def rerun(tmp_path_factory) -> subprocess.CompletedProcess:
    folder = tmp_path_factory.mktemp("rerun")
    with progress_off():  # as the book runner executes the chapters
        paths = [_executed(folder, name, cells) for name, cells in CELLS.items()]
    return nbval_rerun(paths, cwd=folder)


def test_sanitised_outputs_pass_and_are_counted(rerun):
    assert "steady.ipynb::Cell" not in rerun.stdout.split("short test summary")[-1], rerun.stdout[-3000:]
    summary = next(line for line in rerun.stdout.splitlines() if line.startswith("nbval rerun:"))
    assert re.search(r"4 notebooks, 7 cells; \d+ outputs compared \(\d+ text, 2 images", summary), summary
    for pattern in ("memory addresses 1", "timings 1", "versions 1"):
        assert pattern in summary, summary


def test_changed_numbers_and_changed_pixels_fail(rerun):
    failed = re.findall(r"FAILED (?:\S*/)?(\w+)\.ipynb::Cell (\d+)", rerun.stdout)
    assert sorted(failed) == [("random_image", "0"), ("random_number", "0")], rerun.stdout[-3000:]
    assert "images differ: stored 1 with pixel hashes" in rerun.stdout


def test_progress_bars_are_off_under_the_check(rerun):
    assert "progress_bar.ipynb::Cell 0" not in rerun.stdout.split("short test summary")[-1]


def test_every_pattern_is_named_and_compiles(tmp_path):
    assert set(sanitizers()) >= {"versions", "memory addresses", "table ids", "timings", "paths"}
    broken = tmp_path / "broken.cfg"
    broken.write_text("[typo]\nregex: (\nreplace: x\n")
    with pytest.raises(re.error):
        sanitizers(broken)
    broken.write_text("[half]\nregex: x\n")
    with pytest.raises(ValueError, match=r"\[half\] must hold exactly 'regex:' and 'replace:'"):
        sanitizers(broken)
    assert SANITIZE_FILE.is_file()
