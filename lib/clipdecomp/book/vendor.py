"""Front-end assets the static site needs offline (MathJax, the ipywidgets renderer), from npm.

The rendered book must work without any server or internet: the default configurations of Sphinx
and myst-nb load MathJax and the widget renderer from CDNs. ``vendor`` fetches pinned npm packages
with ``npm pack`` (cached in ``_build/npm``) and copies the needed files into the staged book's
``_static/vendor``; ``_config.yml`` points Sphinx and myst-nb at them.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import warnings
from pathlib import Path

__all__ = ["ASSETS", "vendor"]

# npm package -> (version, {path inside the package: path under _static/vendor})
ASSETS: dict[str, tuple[str, dict[str, str]]] = {
    "mathjax": (
        "3.2.2",
        {
            "es5/tex-mml-chtml.js": "mathjax/tex-mml-chtml.js",
            "es5/output/chtml/fonts/woff-v2": "mathjax/output/chtml/fonts/woff-v2",
        },
    ),
    "@jupyter-widgets/html-manager": ("1.0.15", {"dist": "widgets"}),
}


def _tarball(package: str, version: str, cache: Path) -> Path:
    name = f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"
    path = cache / name
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "pack", f"{package}@{version}", "--pack-destination", str(cache)],
            check=True,
            capture_output=True,
            text=True,
        )
    return path


def vendor(static_dir: Path, cache: Path) -> bool:
    """Copy the pinned assets into ``static_dir/vendor``; False (with a warning) when npm is missing."""
    if shutil.which("npm") is None:
        warnings.warn(
            "npm not found: the site will load MathJax and the widget renderer from CDNs "
            "(install Node.js/npm for a fully offline site)."
        )
        return False
    target = static_dir / "vendor"
    for package, (version, files) in ASSETS.items():
        with tarfile.open(_tarball(package, version, cache)) as archive:
            for member in archive.getmembers():
                inner = member.name.removeprefix("package/")
                for source, destination in files.items():
                    if (
                        member.isfile()
                        and (inner == source or inner.startswith(source + "/"))
                        and not inner.endswith((".map", "amd.js"))
                    ):  # source maps, RequireJS builds
                        out = (
                            target / destination / inner[len(source) :].lstrip("/")
                            if inner != source
                            else target / destination
                        )
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(archive.extractfile(member).read())
    return True
