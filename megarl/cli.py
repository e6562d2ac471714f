"""The `megarl` command line: RL training, grading, evaluation and checkpoint tools.

Each subcommand is a module in megarl/commands/ that defines

    HELP: str                          one line for `megarl --help`
    add_arguments(parser) -> None      its argparse arguments
    main(args) -> int                  the exit status

Command modules import heavy dependencies inside main(), so `megarl --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import megarl.commands


def _command_modules():
    for info in sorted(pkgutil.iter_modules(megarl.commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        yield info.name.replace("_", "-"), importlib.import_module(f"megarl.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megarl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _command_modules():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except ValueError as exc:
        # User errors (bad recipe keys, files, flags) are ValueErrors with a message that names
        # the culprit: print it without a traceback. MEGARL_DEBUG=1 shows the traceback.
        if os.environ.get("MEGARL_DEBUG") == "1":
            raise
        print(f"megarl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
