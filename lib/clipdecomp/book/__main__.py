"""Command line: ``python -m clipdecomp.book {execute,build} --profile {ci,cpu,paper} [--only NAME ...]``."""
from __future__ import annotations

import argparse

from .runner import PROFILES, build_site, execute_notebooks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clipdecomp.book", description=__doc__)
    parser.add_argument("action", choices=["execute", "build"], help="execute notebooks only, or execute then build the site")
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="execute only the chapters whose notebook name contains one of these (e.g. 02_ 03_)")
    args = parser.parse_args(argv)
    try:
        for run in execute_notebooks(args.profile, only=args.only):
            print(f"{run.entry}: {run.seconds:.1f} s")
        if args.action == "build":
            print(f"site built in {build_site()}")
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # bad selection, missing data, failed chapter
        parser.exit(2, f"{parser.prog} {args.action}: error: {error}\n")


if __name__ == "__main__":
    main()
