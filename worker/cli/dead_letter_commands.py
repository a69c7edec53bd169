"""``tail --dead-letters`` and ``redrive``: read the dead letters, and send chosen ones back."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from worker.cli.model_commands import say
from worker.config import Settings

if TYPE_CHECKING:
    from worker.connections import KafkaConnection


def quiet_kafka_logs(args: argparse.Namespace) -> None:
    """aiokafka logs each failed reconnection (hundreds once a broker is gone): a reader reports
    the broker's state itself (:class:`~worker.dev.client.BrokerWatch`); ``--log-level DEBUG``
    shows them again."""
    if str(args.log_level).upper() != "DEBUG":
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def follow_until_stopped(
    follow: Callable[..., Coroutine[Any, Any, int]],
    kafka: KafkaConnection,
    show: Callable[..., None],
    args: argparse.Namespace,
) -> int:
    """Run a ``tail`` reader (``follow_intents``, ``follow_dead_letters``) with the command's
    options until its ``--count``, its ``--timeout`` or Ctrl-C; the broker's state goes to stderr."""
    from worker.dev.client import BrokerWatch

    async def until_stopped() -> None:
        # Ctrl-C (or SIGTERM) sets a flag the reader checks at every fetch, at most 1 s apart,
        # instead of cancelling it: a cancellation can be swallowed (see `follow`), a flag cannot.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await follow(
            kafka,
            show,
            from_beginning=args.from_beginning,
            count=args.count,
            timeout_s=args.timeout,
            watch=BrokerWatch(kafka.bootstrap, say),
            stop=stop,
        )

    with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C before the handlers are in place
        asyncio.run(until_stopped())
    return 0


def tail_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from worker.dev.dead_letters import StoredLetter, describe_letter, follow_dead_letters
    from worker.dev.run_state import find_kafka_connection

    kafka = find_kafka_connection(settings)
    quiet_kafka_logs(args)

    def show(stored: StoredLetter, raw: bytes) -> None:
        print(raw.decode("utf-8", errors="replace") if args.json else describe_letter(stored), flush=True)

    if not args.quiet:
        say(
            f"dead letters from {kafka.bootstrap} (where, input position, stage, reason, id, size, "
            "original); `intent-worker redrive` sends chosen ones back; Ctrl-C stops"
        )
    return follow_until_stopped(follow_dead_letters, kafka, show, args)


def redrive(settings: Settings, args: argparse.Namespace) -> int:
    from worker.dev.dead_letters import (
        Selection,
        describe_letter,
        parse_position,
        read_all_dead_letters,
    )
    from worker.dev.dead_letters import redrive as send_back
    from worker.dev.run_state import find_kafka_connection
    from worker.topics import DEAD_LETTERS, UTTERANCES

    selection = Selection(
        ids=frozenset(args.id or ()),
        positions=frozenset(parse_position(p) for p in args.offset or ()),
        reasons=frozenset(args.reason or ()),
        stages=frozenset(args.stage or ()),
        everything=args.all,
    )
    kafka = find_kafka_connection(settings)
    letters = asyncio.run(read_all_dead_letters(kafka))
    chosen = [stored for stored in letters if selection.matches(stored)]
    report = asyncio.run(send_back(kafka, chosen, dry_run=args.dry_run))
    for stored in report.sent:
        print(describe_letter(stored), flush=True)
    for stored in report.truncated:
        say(
            f"not sent: dlq:{stored.partition}:{stored.offset} ({stored.position}) kept only "
            f"{len(stored.letter.original())} of its {stored.letter.original_size} bytes"
        )
    verb = "would send" if args.dry_run else "sent"
    say(
        f"{verb} {len(report.sent)} of {len(letters)} dead letter(s) in {DEAD_LETTERS!r} back to "
        f"{UTTERANCES!r} with their original bytes and keys"
        + (f"; {len(report.truncated)} truncated one(s) cannot be" if report.truncated else "")
    )
    return 0 if not report.truncated else 1


def add_redrive_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    redrive_parser = commands.add_parser(
        "redrive",
        help="send chosen dead letters back to the utterances topic, with their original bytes",
        description="Reads utterances.dlq from its start to its current end and re-publishes the "
        "original value and key of every dead letter that matches all the given filters (any value "
        "within one filter). Positions and reasons are those `tail --dead-letters` prints.",
    )
    redrive_parser.add_argument(
        "--id", action="append", help="utterance id (the original's 'id', else its key); repeatable"
    )
    redrive_parser.add_argument(
        "--offset",
        action="append",
        metavar="PARTITION:OFFSET",
        help="where the input was read in utterances, e.g. 2:1534; repeatable",
    )
    redrive_parser.add_argument(
        "--reason", action="append", help="failure reason, e.g. text_too_long or not_json; repeatable"
    )
    redrive_parser.add_argument(
        "--stage", action="append", choices=["decode", "classify"], help="the stage that failed; repeatable"
    )
    redrive_parser.add_argument(
        "--all", action="store_true", help="every dead letter (no filter needs to be given)"
    )
    redrive_parser.add_argument(
        "--dry-run", action="store_true", help="list what would be sent, send nothing"
    )
    redrive_parser.set_defaults(handler=redrive, timing=False)
