"""Shared fixtures: small random-init models built once per test session, and the built book."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import clipdecomp
import open_clip
import pytest
import torch


def tiny_clip(**vision_overrides) -> torch.nn.Module:
    """A tiny open_clip CLIP (3 layers, 4 heads, 32 px) with optional vision-config overrides."""
    vision = dict(image_size=32, patch_size=8, width=64, layers=3, head_width=16)
    vision.update(vision_overrides)
    text = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
    torch.manual_seed(0)
    return open_clip.model.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text).eval()


@pytest.fixture(scope="session")
def vit_b32() -> clipdecomp.ClipBundle:
    torch.manual_seed(0)
    return clipdecomp.load("ViT-B-32")


@pytest.fixture(scope="session")
def images224() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def nbval_rerun(notebooks: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    """``pytest --nbval`` (with clipdecomp.book.rerun) over executed notebooks, in a child process."""
    command = [sys.executable, "-m", "pytest", "--nbval", "-p", "clipdecomp.book.rerun"]
    command += ["-p", "no:cacheprovider", "-q", "-rf", *map(str, notebooks)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> tuple[Path, Path, list]:
    """Execute every chapter under the ci profile and build the site once: (staging, html, runs)."""
    from clipdecomp.book import build_site, execute_notebooks

    root = tmp_path_factory.mktemp("book")
    runs = execute_notebooks("ci", staging=root / "src")
    return root / "src", build_site(staging=root / "src", output=root), runs
