"""The ``pact-vlm`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import pact_vlm

    torch.manual_seed(args.seed)
    # Synthetic visual-token keys: a few dense groups (redundant background) plus scattered
    # object tokens, shaped like one image's worth of LLaVA-OneVision tokens.
    groups = torch.randn(args.groups, args.dim)
    keys = groups[torch.randint(0, args.groups, (args.tokens,))] + 0.25 * torch.randn(args.tokens, args.dim)
    hidden = torch.randn(args.tokens, args.dim)
    queries = torch.randn(args.tokens, 4, args.dim // 4)
    red = pact_vlm.pact_reduce(hidden, queries, keys.view(args.tokens, 4, -1), keys.view(args.tokens, 4, -1),
                               prune_ratio=args.prune_ratio, cutoff=args.cutoff, alpha=args.alpha)
    dropped = int((red.labels == -1).sum())
    print(f"visual tokens: {red.num_before} -> {red.num_after} "
          f"({1 - red.num_after / red.num_before:.1%} fewer); "
          f"largest cluster {int(red.sizes.max())} tokens; dropped {dropped}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pact-vlm", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="reduce a synthetic set of visual-token keys with PACT")
    demo.add_argument("--tokens", type=int, default=2000, help="number of visual tokens")
    demo.add_argument("--dim", type=int, default=256, help="key dimension")
    demo.add_argument("--groups", type=int, default=300, help="number of key groups")
    demo.add_argument("--prune-ratio", type=float, default=0.45)
    demo.add_argument("--cutoff", type=float, default=0.21)
    demo.add_argument("--alpha", type=float, default=1.5)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        if args.debug:
            raise
        print(f"pact-vlm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
