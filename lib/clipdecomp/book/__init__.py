"""Execute the book's notebooks with papermill under a named profile, then build the static site.

    python -m clipdecomp.book build --profile cpu     # execute every chapter, then jupyter-book build
    python -m clipdecomp.book execute --profile ci   # execute only (used by the tests)

Executed copies go to ``_build/src`` (a staging copy of the book), never over the sources.
"""

from ..paths import repo_root
from .runner import PROFILES, build_site, execute_notebooks

__all__ = ["PROFILES", "build_site", "execute_notebooks", "repo_root"]
