"""`pie sandbox build [--force] | status`: the inferlet sandbox runtime (built once per install)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pie.runtime.executors.build import artifact_path, build


def main(argv: list[str] | None = None) -> int:
    """`pie sandbox build [--force]` / `pie sandbox status`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", type=Path, default=None, help="Pie home (default $PIE_HOME)")
    parser = argparse.ArgumentParser(
        prog="pie sandbox", description="The inferlet sandbox runtime."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser(
        "build", parents=[common], help="build and cache the runtime now (once per install)"
    )
    make.add_argument("--force", action="store_true", help="rebuild even if cached")
    commands.add_parser(
        "status", parents=[common], help="where the runtime is cached and whether it is built"
    )
    opts = parser.parse_args(argv)
    if opts.command == "status":
        path = artifact_path(opts.home)
        print(f"{path} ({'built' if path.exists() else 'not built: run `pie sandbox build`'})")
        return 0 if path.exists() else 1
    try:
        path = build(opts.home, opts.force, progress=lambda line: print(line, flush=True))
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"sandbox runtime ready: {path}")
    return 0
