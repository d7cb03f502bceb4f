"""`refusal-nnsight-organism`: build or check the offline model organism.

refusal-nnsight-organism build [--recipe default|small] [--no-eval]   rebuild from scratch
refusal-nnsight-organism check [--recipe default|small]               verify its targets
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..errors import UserError


def _parser() -> argparse.ArgumentParser:
    from .build import RECIPES

    parser = argparse.ArgumentParser(prog="refusal-nnsight-organism", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the organism and its SAEs from scratch (replaces any cached one)")
    b.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    b.add_argument("--no-eval", action="store_true", help="skip the held-out refusal / splice evaluation")
    c = sub.add_parser("check", help="check a built organism against its targets")
    c.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "build":
            from .build import build
            from .store import read_manifest

            root = build(args.recipe, evaluate=not args.no_eval)
            m = read_manifest(root)
            summary = {k: m[k] for k in ("recipe", "recipe_hash", "build_seconds", "saes", "eval") if k in m}
            print(f"organism built: {root}\n{json.dumps(summary, indent=2)}")
            return 0
        from .check import main as check_main  # written by the lead; imported only when asked for

        return check_main(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
