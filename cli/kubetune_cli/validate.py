"""`kubetune validate MANIFEST...`: check manifests without a cluster (exit 2 naming each bad field)."""

from __future__ import annotations

import argparse
import sys

from kubetune_cli import manifest
from kubetune_cli.errors import EXIT_OK, EXIT_USAGE, CLIError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "validate", help="check FineTuneJob manifests (the same checks as the cluster)", description=__doc__
    )
    p.add_argument("manifests", nargs="+", metavar="MANIFEST", help="FineTuneJob YAML files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.manifests:
        try:
            m = manifest.load(path)
        except CLIError as e:
            print(f"error: {e.message}", file=sys.stderr)
            bad += 1
            continue
        print(f"{path}: {m.namespace}/{m.name} is valid")
    return EXIT_USAGE if bad else EXIT_OK
