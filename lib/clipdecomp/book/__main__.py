"""Command line: ``python -m clipdecomp.book {execute,build} --profile {ci,cpu,paper} [--only NAME ...]``.

``python -m clipdecomp.book setup-cells`` writes the standard setup cell into every chapter (after
``SETUP_CELL`` in ``clipdecomp.book.chapters`` changes, e.g. the repository or the version).
"""

from __future__ import annotations

import argparse

from .chapters import write_setup_cells
from .runner import PROFILES, build_site, execute_notebooks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clipdecomp.book", description=__doc__)
    parser.add_argument(
        "action",
        choices=["execute", "build", "setup-cells"],
        help="execute notebooks only, execute then build the site, or rewrite every chapter's setup cell",
    )
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="execute only the chapters whose notebook name contains one of these (e.g. 02_ 03_)",
    )
    args = parser.parse_args(argv)
    if args.action == "setup-cells":
        changed = write_setup_cells()
        print(
            f"setup cell rewritten in {len(changed)} notebook(s){': ' if changed else ''}{', '.join(changed)}"
        )
        return
    try:
        for run in execute_notebooks(args.profile, only=args.only):
            print(f"{run.entry}: {run.seconds:.1f} s")
        if args.action == "build":
            print(f"site built in {build_site()}")
    except (
        ValueError,
        FileNotFoundError,
        RuntimeError,
    ) as error:  # bad selection, missing data, failed chapter
        parser.exit(2, f"{parser.prog} {args.action}: error: {error}\n")


if __name__ == "__main__":
    main()
