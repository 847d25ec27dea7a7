"""`engram`: the command line. --db, --json and -v go before or after the subcommand; --model and
--device only belong to the commands that load a model.

User mistakes end in one clear line on stderr and a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import metadata

from memory.errors import EngramError

log = logging.getLogger("engram")

# Commands that only read or write the store: they never load a model, so they take no --model/--device.
MODEL_FREE = frozenset({"status", "contexts", "facts", "route", "report", "compact"})
DEFAULT_MODEL = "smollm2-135m"


def version() -> str:
    try:
        return metadata.version("engram-agent")
    except metadata.PackageNotFoundError:
        return "unknown"


def _store_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    # On a subcommand the flags default to SUPPRESS, so `engram --db X status` keeps the X given before it.
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    parser.add_argument("--db", default=default(None),
                        help="SQLAlchemy URL of the fact store (default: $ENGRAM_DB or sqlite:///store.sqlite at the repo root)")
    parser.add_argument("--json", action="store_true", default=default(False), help="print machine-readable JSON")
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False), help="log progress details")


def _model_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    parser.add_argument("--model", default=default(None),
                        help=f"base model: {DEFAULT_MODEL} (default, offline; or $ENGRAM_MODEL), gemma3-270m, "
                             "a local path or a hub id")
    parser.add_argument("--device", default=default(None), choices=["auto", "cpu", "cuda"],
                        help="where the model runs (default: $ENGRAM_DEVICE or auto)")


def build_parser() -> argparse.ArgumentParser:
    from agent import commands

    parser = argparse.ArgumentParser(prog="engram", description="A continual-editing memory agent.")
    parser.add_argument("--version", action="version", version=f"engram {version()}")
    _store_flags(parser, top=True)
    _model_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (handler, configure, help_text) in commands.REGISTRY.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _store_flags(p, top=False)
        if name not in MODEL_FREE:
            _model_flags(p, top=False)
        configure(p)
        p.set_defaults(handler=handler)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in MODEL_FREE:
        given = [flag for flag in ("model", "device") if getattr(args, flag) is not None]
        if given:
            parser.error(f"`engram {args.command}` loads no model: --{given[0]} does not apply to it")
        del args.model, args.device
    else:
        args.model = args.model or os.environ.get("ENGRAM_MODEL") or DEFAULT_MODEL
        args.device = args.device or os.environ.get("ENGRAM_DEVICE") or "auto"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    except Exception as exc:  # a bug, not a user mistake: still one line, the traceback with -v
        if args.verbose:
            raise
        print(f"engram: internal error: {type(exc).__name__}: {exc} (rerun with -v for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
