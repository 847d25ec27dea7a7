"""`engram`: the command line. Each subcommand takes --db and --model; --json where programs read it.

User mistakes end in one clear line on stderr and a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from memory.errors import EngramError

log = logging.getLogger("engram")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, help="SQLAlchemy URL of the fact store (default: $ENGRAM_DB or sqlite:///store.sqlite at the repo root)")
    parser.add_argument("--model", default=os.environ.get("ENGRAM_MODEL", "smollm2-135m"),
                        help="base model: smollm2-135m (default, offline), gemma3-270m, a local path or a hub id")
    parser.add_argument("--device", default=os.environ.get("ENGRAM_DEVICE", "auto"), choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def build_parser() -> argparse.ArgumentParser:
    from agent import commands

    parser = argparse.ArgumentParser(prog="engram", description="A continual-editing memory agent.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (handler, configure, help_text) in commands.REGISTRY.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p)
        configure(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except EngramError as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}))
        print(f"engram: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("engram: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
