"""Style is checked, not hoped for: ruff's lint and format (configured in pyproject.toml) pass on the tree."""

from __future__ import annotations

import subprocess
import sys

from clipdecomp.paths import repo_root


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=repo_root(), capture_output=True, text=True
    )


def test_ruff_lint_passes():
    result = _ruff("check", ".")
    assert result.returncode == 0, result.stdout[-3000:]


def test_ruff_format_is_applied():
    result = _ruff("format", "--check", ".")
    assert result.returncode == 0, "run `ruff format .`:\n" + result.stdout[-3000:]
