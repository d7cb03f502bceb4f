"""`refusal-nnsight-organism`: build, check and validate the offline model organism.

refusal-nnsight-organism build    [--recipe default|small|smollm2_harmbench] [--seed N] [--no-eval]
                                                                                    train from scratch
refusal-nnsight-organism check    [--recipe ...] [--seed N] [--max-prompts N]       figures vs targets
refusal-nnsight-organism validate [--recipe ...] [--seeds 0-4] [--out DIR]          the pipeline per seed
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..errors import UserError


def _seeds(text: str) -> list[int]:
    """ "0-4" -> [0, 1, 2, 3, 4]; "0,2,5" -> [0, 2, 5]."""
    out: list[int] = []
    try:
        for part in text.split(","):
            a, sep, b = part.partition("-")
            out += list(range(int(a), int(b) + 1)) if sep else [int(a)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds '{text}' must look like 0-4 or 0,2,5") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"seeds '{text}' must be non-negative integers")
    return out


def _count(minimum: int):
    """An argparse type: an integer >= minimum (a bad value is one usage line, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"'{text}' must be an integer >= {minimum}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    from .recipe import RECIPES

    parser = argparse.ArgumentParser(prog="refusal-nnsight-organism", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the organism and its SAEs from scratch into the cache")
    b.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    b.add_argument(
        "--seed",
        type=_count(0),
        default=0,
        help="organism seed (the default recipe ships seeds 0-4; a rebuild of one says if it equals it)",
    )
    b.add_argument("--no-eval", action="store_true", help="skip the held-out refusal / splice evaluation")
    c = sub.add_parser(
        "check",
        help="measure every planted mechanism (a tuned model: its held-out figures) against its target "
        "(exit 1 on a miss)",
    )
    c.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    c.add_argument("--seed", type=_count(0), default=0)
    c.add_argument("--max-prompts", type=_count(1), default=None, help="test prompts used (default: all)")
    v = sub.add_parser(
        "validate", help="run the pipeline on the organisms of several seeds (shipped, or built once)"
    )
    v.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    v.add_argument("--seeds", type=_seeds, default=_seeds("0-4"), help="e.g. 0-4 or 0,2,5")
    v.add_argument("--out", default="runs/validate", help="folder of the runs and the table")
    v.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Hydra overrides given to every scope's run after its own, e.g. search.candidates.top_k=40: "
        "the table then measures that setting against the same targets",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "build":
            return _build(args)
        if args.command == "check":
            from .check import main as check_main

            return check_main(args)
        from .validate import main as validate_main

        return validate_main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def _build(args: argparse.Namespace) -> int:
    from .build import build
    from .store import content_hash, is_shipped, read_manifest, rebuild_equals_shipped

    root = build(args.recipe, seed=args.seed, evaluate=not args.no_eval)
    m = read_manifest(root)
    keys = ("recipe", "seed", "recipe_hash", "build_seconds", "saes", "eval", "train", "artifact_bytes")
    summary = {k: m[k] for k in keys if k in m}
    summary["content_hash"] = content_hash(root)
    if is_shipped(args.recipe, args.seed):
        summary["equals_shipped"] = rebuild_equals_shipped(args.recipe, args.seed)
    print(f"organism built: {root}\n{json.dumps(summary, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
