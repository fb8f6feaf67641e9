"""The book runner: papermill execution in ``_toc.yml`` order, a status page, then a strict build."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Literal, Sequence

import nbformat
import yaml

from ..checks import check_texts_list
from ..paths import repo_root
from ..progress import progress_off
from .chapters import add_colab_link
from .links import broken_internal_links
from .vendor import vendor

__all__ = [
    "PROFILES",
    "CHAPTER_PARAMETERS",
    "DATA_VARIABLES",
    "DataVariable",
    "Run",
    "chapter_parameters",
    "toc_notebooks",
    "select_chapters",
    "execute_notebooks",
    "build_site",
]

# Parameters injected into every notebook under each profile (only those a notebook declares).
PROFILES: dict[str, dict[str, object]] = {
    "ci": {"n_images": 64, "device": "cpu"},  # each notebook's defaults already use the toy model
    "cpu": {"device": "cpu"},
    "paper": {"model_spec": "ViT-L-14/laion2b_s32b_b82k", "device": "auto"},
}

# Per-chapter parameters on top of the profile's; "$NAME" is read from the environment variable NAME.
CHAPTER_PARAMETERS: dict[str, dict[str, dict[str, object]]] = {
    "paper": {
        "02_layer_ablations": {"dataset": "$CLIPDECOMP_IMAGENET_VAL", "n_images": 50_000, "batch_size": 256},
        "03_text_span": {
            "dataset": "$CLIPDECOMP_IMAGENET_VAL",
            "main_pool": "descriptions",
            "n_images": 10_000,
            "batch_size": 256,
        },
        "06_spurious_cues": {"dataset": "$CLIPDECOMP_WATERBIRDS"},
        "07_segmentation": {
            "dataset": "imagenet-seg",
            "seg_path": "$CLIPDECOMP_IMAGENET_SEG",
            "n_images": None,
        },
        "11_backends": {"clip_spec": "ViT-B-16/openai", "siglip_spec": "ViT-B-16-SigLIP/webli"},
        "10_second_order": {  # the follow-up paper's setting: OpenAI ViT-B-32, layer 9
            "model_spec": "ViT-B-32/openai",
            "dataset": "$CLIPDECOMP_IMAGENET_VAL",
            "pool": "words",
            "n_images": 5000,
            "top_k": 100,
            "n_texts": 128,
            "seg_dataset": "imagenet-seg",
            "seg_path": "$CLIPDECOMP_IMAGENET_SEG",
            "seg_images": None,
            "batch_size": 256,
        },
    },
}


@dataclass(frozen=True)
class DataVariable:
    """What a dataset variable must point to: a ``folder`` (holding ``contains``, if given) or a ``file``."""

    kind: Literal["folder", "file"]
    holds: str
    contains: str | None = None


DATA_VARIABLES = {
    "CLIPDECOMP_IMAGENET_VAL": DataVariable(
        "folder",
        "an ImageNet validation folder with one sub-folder per class "
        "named by wnid (n01440764/...), e.g. from image-net.org's ILSVRC2012 "
        "validation set",
    ),
    "CLIPDECOMP_WATERBIRDS": DataVariable(
        "folder",
        "the extracted waterbird_complete95_forest2water2 folder of Sagawa "
        "et al. (see clipdecomp.datasets.HOW_TO_GET_WATERBIRDS)",
        "metadata.csv",
    ),
    "CLIPDECOMP_IMAGENET_SEG": DataVariable(
        "file", "the gtsegs_ijcv.mat file of ImageNet-segmentation (Guillaumin et al.)"
    ),
}
"""Environment variables the ``paper`` profile reads dataset locations from."""


@dataclass
class Run:
    """One executed chapter, for the status page."""

    entry: str
    seconds: float
    parameters: dict


def toc_notebooks(root: Path) -> list[str]:
    """Notebook paths (without suffix) in ``_toc.yml`` order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    entries = [toc["root"]] + [c["file"] for part in toc.get("parts", []) for c in part.get("chapters", [])]
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


def select_chapters(entries: Sequence[str], only: Sequence[str] | None) -> list[str]:
    """The entries whose notebook name contains one of ``only`` (None: all of them).

    An empty selection, an empty name, or a name that matches no chapter is an error listing the
    chapters, never "run everything" or "run nothing".
    """
    if only is None:
        return list(entries)
    names = check_texts_list("only", only)
    chapters = [Path(e).name for e in entries]
    if not names or not all(name.strip() for name in names):
        raise ValueError(
            f"only={names!r} selects no chapter by name: leave it out to execute every chapter, or name "
            f"some of {chapters} (substrings such as '02_' work)."
        )
    unmatched = [name for name in names if not any(name in chapter for chapter in chapters)]
    if unmatched:
        raise ValueError(f"only: {unmatched} match no chapter; the chapters are {chapters}.")
    return [e for e, chapter in zip(entries, chapters) if any(name in chapter for name in names)]


def execute_notebooks(
    profile: str = "cpu",
    root: Path | None = None,
    only: Sequence[str] | None = None,
    staging: Path | None = None,
) -> list[Run]:
    """Stage the book and execute its chapters (all, or those :func:`select_chapters` picks)
    under ``profile``.

    A failing cell raises ``RuntimeError`` naming the notebook and the cell.
    """
    import papermill

    if not isinstance(profile, str) or profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}; choose one of {sorted(PROFILES)}.")
    root = root or repo_root()
    staging = staging or root / "_build" / "src"
    entries = toc_notebooks(root)
    chosen = select_chapters(entries, only)
    _check_data_variables(profile, chosen)
    _stage(root, staging)
    runs = []
    for entry in entries:
        path = staging / f"{entry}.ipynb"
        notebook = nbformat.read(path, as_version=4)
        add_colab_link(notebook, entry)
        nbformat.write(notebook, path)
        if entry not in chosen:
            continue
        declared = papermill.inspect_notebook(str(path))
        # caches live outside the staging folder (wiped by each run) so an interrupted run can resume
        settings = {
            **chapter_parameters(profile, entry),
            "cache_dir": os.path.relpath(root / "_build" / "caches", path.parent),
        }
        injected = {k: v for k, v in settings.items() if k in declared}
        print(f"[{profile}] executing {entry}.ipynb", flush=True)
        start = time.perf_counter()
        try:
            with progress_off():  # no frozen bars in the pages; reruns (nbval) give the same outputs
                papermill.execute_notebook(
                    str(path),
                    str(path),
                    parameters=injected,
                    cwd=str(path.parent),
                    kernel_name="python3",
                    progress_bar=False,
                )
        except papermill.PapermillExecutionError as error:
            raise RuntimeError(
                f"{entry}.ipynb failed in cell {error.exec_count}: {error.ename}: {error.evalue}"
            ) from error
        defaults = {k: v["default"] for k, v in declared.items()}
        runs.append(
            Run(entry, time.perf_counter() - start, {**defaults, **{k: repr(v) for k, v in injected.items()}})
        )
    _write_status(staging, profile, runs)
    return runs


def _variable(value: object) -> str | None:
    """The environment variable a ``"$NAME"`` parameter value names, else None."""
    return value[1:] if isinstance(value, str) and value.startswith("$") else None


def chapter_parameters(profile: str, entry: str) -> dict[str, object]:
    """What ``profile`` injects into chapter ``entry`` (e.g. ``notebooks/02_layer_ablations``), with the
    environment variables read."""
    settings = {**PROFILES[profile], **CHAPTER_PARAMETERS.get(profile, {}).get(Path(entry).name, {})}
    return {
        key: os.environ.get(_variable(value), value) if _variable(value) else value
        for key, value in settings.items()
    }


def _location_problem(name: str, where: str | None) -> str | None:
    """Why the value of dataset variable ``name`` is unusable, or None."""
    wanted = DATA_VARIABLES[name]
    if not where:
        return "is not set"
    path = Path(where).expanduser()
    if not path.exists():
        return f"points to {where}, which does not exist"
    if wanted.kind == "folder" and not path.is_dir():
        return f"points to {where}, which is a file, not a folder"
    if wanted.kind == "file" and not path.is_file():
        return f"points to {where}, which is a folder, not a file"
    if wanted.contains and not (path / wanted.contains).is_file():
        return f"points to {where}, which holds no {wanted.contains}"
    return None


def _check_data_variables(profile: str, entries: list[str]) -> None:
    """Fail before anything runs when a dataset location the profile needs is unset, missing or the
    wrong kind."""
    problems = []
    for entry in entries:
        overrides = CHAPTER_PARAMETERS.get(profile, {}).get(Path(entry).name, {})
        for name in filter(None, map(_variable, overrides.values())):
            state = _location_problem(name, os.environ.get(name))
            if state:
                problems.append(f"{name} {state} ({Path(entry).name} needs {DATA_VARIABLES[name].holds})")
    if problems:
        raise FileNotFoundError(
            f"The {profile!r} profile reads real datasets, and "
            + "; ".join(dict.fromkeys(problems))
            + ". Set each variable to the dataset's location (or run one chapter with --only)."
        )


def _weights_receipt(spec: str) -> str:
    """sha256 of the weights a spec names, where they are on this machine."""
    from clipdecomp.loading import file_sha256, toy_model_dir

    spec = spec.strip("'\"")
    if spec == "toy":
        weights = toy_model_dir() / "open_clip_model.safetensors"
        return file_sha256(weights)[:16] if weights.is_file() else "missing"
    return "random init" if "/" not in spec else "downloaded by open_clip"


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        if cpuinfo.is_file()
        else []
    )
    return f"{names[0] if names else platform.processor() or 'CPU'} ({os.cpu_count()} cores, no GPU)"


def _write_status(staging: Path, profile: str, runs: list[Run]) -> None:
    """The reproducibility receipt: ``book/status.md`` in the staged book."""
    packages = ["clipdecomp", "torch", "open_clip_torch", "numpy", "jupyter-book", "papermill"]
    lines = [
        "# Status of this build",
        "",
        f"Executed {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC under the **{profile}** profile on "
        f"{_hardware()}, Python {platform.python_version()}. Executing the chapters took "
        f"{sum(r.seconds for r in runs) / 60:.1f} minutes in all (target for the cpu profile on 2 cores: "
        "at most 10 minutes).",
        "",
        "| chapter | run time (s) | model | weights sha256 | dataset |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        spec = str(run.parameters.get("model_spec", "-"))
        lines.append(
            f"| {run.entry.split('/')[-1]} | {run.seconds:.1f} | `{spec.strip(chr(39) + chr(34))}` | "
            f"{_weights_receipt(spec) if spec != '-' else '-'} | {run.parameters.get('dataset', '-')} |"
        )
    lines += ["", "| package | version |", "|---|---|"] + [f"| {p} | {version(p)} |" for p in packages]
    (staging / "book" / "status.md").write_text("\n".join(lines) + "\n")


def build_site(root: Path | None = None, staging: Path | None = None, output: Path | None = None) -> Path:
    """Strict jupyter-book build of the staged, executed book into ``<output>/_build/html``, links checked.

    ``output`` defaults to the repository root, so the site lands in ``_build/html``.
    """
    root = root or repo_root()
    staging = staging or root / "_build" / "src"
    output = output or root
    vendor(staging / "_static", root / "_build" / "npm")
    command = [
        str(Path(sys.executable).parent / "jupyter-book"),
        "build",
        str(staging),
        "--path-output",
        str(output),
        "-n",
        "-W",
        "--keep-going",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    html = output / "_build" / "html"
    broken = broken_internal_links(html)
    if broken:
        raise RuntimeError(
            f"{len(broken)} broken internal links in the built site:\n" + "\n".join(broken[:50])
        )
    return html
