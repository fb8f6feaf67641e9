"""The book runner: papermill execution in ``_toc.yml`` order, then a strict jupyter-book build."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

__all__ = ["PROFILES", "repo_root", "toc_notebooks", "execute_notebooks", "build_site"]

# Parameters injected into every notebook under each profile (a notebook ignores names it lacks).
PROFILES: dict[str, dict[str, object]] = {
    "ci": {"n_images": 64, "device": "cpu"},  # each notebook's defaults already use the toy model
    "cpu": {"device": "cpu"},
    "paper": {"model_spec": "ViT-L-14/laion2b_s32b_b82k", "device": "auto"},
}


def repo_root() -> Path:
    """The repository holding this (editable) package."""
    return Path(__file__).resolve().parents[3]


def toc_notebooks(root: Path) -> list[str]:
    """Notebook paths (without suffix) in ``_toc.yml`` order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    entries = [toc["root"]] + [c["file"] for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}])
                               for c in part.get("chapters", [])]
    return [e for e in entries if (root / f"{e}.ipynb").is_file()]


def _stage(root: Path, staging: Path) -> None:
    """Copy the book's sources (config, toc, pages, notebooks) into ``staging``."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root / name, staging / name)
    for folder in ("book", "notebooks"):
        shutil.copytree(root / folder, staging / folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))


def execute_notebooks(profile: str = "cpu", root: Path | None = None, only: list[str] | None = None,
                      staging: Path | None = None) -> dict[str, float]:
    """Execute the chapters with papermill under ``profile``; returns seconds per notebook.

    A failing cell raises ``RuntimeError`` naming the notebook (papermill's error names the cell).
    """
    import papermill

    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}; choose one of {sorted(PROFILES)}.")
    root = root or repo_root()
    staging = staging or root / "_build" / "src"
    _stage(root, staging)
    timings = {}
    for entry in toc_notebooks(root):
        if only and not any(name in entry for name in only):
            continue
        path = staging / f"{entry}.ipynb"
        declared = papermill.inspect_notebook(str(path))
        parameters = {k: v for k, v in PROFILES[profile].items() if k in declared}
        start = time.perf_counter()
        print(f"[{profile}] executing {entry}.ipynb", flush=True)
        try:
            papermill.execute_notebook(str(path), str(path), parameters=parameters,
                                       cwd=str(path.parent), kernel_name="python3", progress_bar=False,
                                       report_mode=False)
        except papermill.PapermillExecutionError as error:
            raise RuntimeError(f"{entry}.ipynb failed in cell {error.exec_count}: {error.ename}: {error.evalue}") from error
        timings[entry] = time.perf_counter() - start
    return timings


def build_site(root: Path | None = None, staging: Path | None = None, output: Path | None = None) -> Path:
    """Strict jupyter-book build of the staged, executed book into ``<output>/_build/html``.

    ``output`` defaults to the repository root, so the site lands in ``_build/html``.
    """
    root = root or repo_root()
    staging = staging or root / "_build" / "src"
    output = output or root
    command = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(staging), "--path-output", str(output),
               "-n", "-W", "--keep-going"]
    env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return output / "_build" / "html"
