"""environment.yml (conda/Colab) pins exactly what pyproject.toml pins."""

from __future__ import annotations

import tomllib

import yaml
from clipdecomp.book import repo_root


def test_environment_yml_matches_pyproject():
    root = repo_root()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    pinned = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        pinned |= set(extra)
    env = yaml.safe_load((root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert {p for p in pip_section if not p.startswith("-e")} == pinned
    assert "python=3.11" in env["dependencies"]
    assert all("==" in p for p in pinned), "every dependency must be pinned to a tested version"
