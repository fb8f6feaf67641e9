"""Command line: ``python -m clipdecomp.book {execute,build} --profile {ci,cpu,paper}``."""
from __future__ import annotations

import argparse

from .runner import PROFILES, build_site, execute_notebooks


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m clipdecomp.book", description=__doc__)
    parser.add_argument("action", choices=["execute", "build"], help="execute notebooks only, or execute then build the site")
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    parser.add_argument("--only", nargs="*", help="substrings of notebook names to execute")
    args = parser.parse_args()
    for run in execute_notebooks(args.profile, only=args.only):
        print(f"{run.entry}: {run.seconds:.1f} s")
    if args.action == "build":
        print(f"site built in {build_site()}")


if __name__ == "__main__":
    main()
