"""`kubetune`: the entry point (console script) and the subcommand table."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from kubetune_cli.errors import EXIT_INTERRUPTED, CLIError

# Subcommand modules, in the order `kubetune --help` lists them.
COMMANDS = ("run", "validate", "status", "plot", "logs", "dev")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description="Fine-tune LLMs with FineTuneJobs: on Kubernetes, or on this machine for development.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens underneath")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"kubetune_cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
