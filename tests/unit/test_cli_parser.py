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


def _train_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", "--data", "ds", "--out", "out", *extra])


def test_lever_flags_a_student_would_ignore_are_refused_before_anything_loads() -> None:
    import pytest

    from worker.cli.train_inputs import check_levers
    from worker.errors import WorkerError

    refused = {
        "pruned students take no row weights": ("--arch", "pruned", "--disagreement-student", "m"),
        "S_sup has no teacher to disagree with": (
            "--arch",
            "cnn",
            "--supervised",
            "--disagreement-student",
            "m",
        ),
        "pruned students have --cosine": ("--arch", "pruned", "--embedding-weight", "1"),
        "S_sup has no teacher embedding": ("--arch", "cnn", "--supervised", "--embedding-weight", "1"),
        "a negative alpha": ("--arch", "cnn", "--disagreement-student", "m", "--disagreement-alpha", "-1"),
        "a negative weight": ("--arch", "cnn", "--embedding-weight", "-0.5"),
        "pruned students keep the teacher's 4-bit rows": ("--arch", "pruned", "--table-bits", "4"),
        "no epochs around the table": ("--arch", "cnn", "--table-bits", "4", "--table-epochs", "0"),
        "pruned students start from the teacher": ("--arch", "pruned", "--init-from", "m"),
        "pruned students keep --min-count's pieces": ("--arch", "pruned", "--keep-characters"),
        "no epochs and nothing to start from": ("--arch", "cnn", "--epochs", "0"),
    }
    for why, flags in refused.items():
        with pytest.raises(WorkerError):
            check_levers(_train_args(*flags))
            pytest.fail(why)
    check_levers(_train_args("--arch", "cnn", "--disagreement-student", "m", "--embedding-weight", "1"))
    check_levers(_train_args("--arch", "cnn", "--init-from", "m", "--epochs", "0", "--table-bits", "4"))
    check_levers(_train_args("--arch", "cnn", "--keep-characters", "--table-bits", "4"))
