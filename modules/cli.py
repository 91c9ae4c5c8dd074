"""Command line over the package: ``python -m modules <command> …``.

Each submodule that offers commands defines ``register(subparsers)``, which adds its
sub-parsers and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and
returning an exit code) on each. This module only collects them, so that each command
lives beside the functions it calls.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

#: Modules asked for commands, in the order ``--help`` lists them.
COMMAND_MODULES = ("data.synthetic", "data.layout", "preprocessing.cells", "modeling.training",
                   "evaluation.evaluate", "notebooks")
#: Which module defines each command, so that one command imports only its own module
#: (``scan`` or ``synth`` then start without loading TensorFlow).
COMMAND_HOMES = {
    "synth": "data.synthetic", "scan": "data.layout", "prepare": "preprocessing.cells",
    "train": "modeling.training", "evaluate": "evaluation.evaluate", "predict": "evaluation.evaluate",
    "demo": "notebooks", "run-notebooks": "notebooks",
}


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser with the registered sub-commands.

    Args:
        command: When it names a known command, only the module defining it is imported;
            otherwise (``--help``, a typo) every command is registered.

    Returns:
        The parser; each sub-parser carries ``func``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m modules",
        description="ANNa: tell leukemic blasts (ALL) from normal cells (HEM) in C-NMC 2019 images.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    names = (COMMAND_HOMES[command],) if command in COMMAND_HOMES else COMMAND_MODULES
    for name in names:
        try:
            module = importlib.import_module(f"modules.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"modules.{name}":
                continue  # that part of the package is not there
            raise
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The process exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CommandError, ValueError, FileNotFoundError) as error:
        # Errors meant for users name the file and the fix; no traceback needed.
        if os.environ.get("ANNA_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
