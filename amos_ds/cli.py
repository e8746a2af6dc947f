"""The `amos-ds` command: one entry point, one subcommand per job.

Each subcommand lives beside the code it drives and exposes `register(subparsers)`, which adds its parser and
sets `func` (taking the parsed args, returning an exit code). Heavy imports stay inside those functions so that
`amos-ds --help` is instant. An amos_ds.errors error ends any subcommand with one line and its exit code.
"""

import argparse
import importlib
import sys

from amos_ds.errors import exit_code_of

# Modules that each register one or more subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "amos_ds.data.commands",
    "amos_ds.train.commands",
    "amos_ds.finetune.commands",
    "amos_ds.export.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amos-ds", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code_of(lambda: int(args.func(args) or 0))


if __name__ == "__main__":
    sys.exit(main())
