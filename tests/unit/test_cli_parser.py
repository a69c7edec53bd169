"""Every subcommand of ``intent-worker`` dispatches to a function (not to its own parser)."""

from __future__ import annotations

import argparse
import inspect

from worker.cli.commands import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], object]]:
    children = _subcommands(parser)
    if not children:
        return [(path, parser.get_default("handler"))]
    return [leaf for name, sub in children.items() for leaf in _leaves(sub, (*path, name))]


def test_every_command_has_a_handler_function() -> None:
    leaves = dict(_leaves(build_parser()))
    assert {("promote",), ("rollback",), ("models",), ("run",)} <= set(leaves)
    wrong = {" ".join(path): handler for path, handler in leaves.items() if not inspect.isfunction(handler)}
    assert wrong == {}
