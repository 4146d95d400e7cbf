"""`docker-event-relay run | check-config | schema | asyncapi | dead-letter list|replay|purge`.

Exit 2 on a bad config, naming the setting. `--config` goes before or after the subcommand.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from relay.errors import ConfigError
from relay.logs import setup_logging
from relay.schema import json_schema


def _when(text: str) -> float:
    """A point in time: unix seconds, or an ISO 8601 date and time (UTC unless it says)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not unix seconds nor an ISO 8601 time"
        ) from exc
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.now().astimezone().tzinfo)
    return stamp.timestamp()


def _parser() -> argparse.ArgumentParser:
    # Accepted before the subcommand and after it; given after, it wins.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="YAML settings file (env: RELAY_CONFIG_FILE); environment variables override it",
    )
    parser = argparse.ArgumentParser(
        prog="docker-event-relay",
        description="Relay Docker Engine events as CloudEvents to Kafka, MQTT and webhooks.",
        parents=[config],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[config], help="relay events until SIGTERM")
    sub.add_parser(
        "check-config", parents=[config], help="validate the settings; exit 0 if valid, 2 if not"
    )
    sub.add_parser("schema", parents=[config], help="print the JSON Schema of the v1 event")
    sub.add_parser(
        "asyncapi",
        parents=[config],
        help="print the AsyncAPI document of the Kafka, MQTT and webhook channels",
    )

    letters = sub.add_parser(
        "dead-letter",
        parents=[config],
        help="list, replay or purge the dead letters kept in the spool",
    )
    actions = letters.add_subparsers(dest="action", required=True)
    selecting = argparse.ArgumentParser(add_help=False)
    selecting.add_argument("--sink", help="only this sink's")
    selecting.add_argument(
        "--reason",
        choices=["permanent", "retries_exhausted", "overflow", "sink_stopped", "malformed"],
        help="only this reason's",
    )
    selecting.add_argument("--since", type=_when, help="from this time (unix s or ISO 8601)")
    selecting.add_argument("--until", type=_when, help="before this time")
    listing = actions.add_parser(
        "list", parents=[config, selecting], help="print the dead letters selected"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--replayed", action="store_true", help="include replayed ones")
    replaying = actions.add_parser(
        "replay",
        parents=[config, selecting],
        help="queue the selected events for their sink again (each once)",
    )
    replaying.add_argument("--dry-run", action="store_true", help="only say what it would do")
    purging = actions.add_parser(
        "purge", parents=[config, selecting], help="delete the selected dead letters"
    )
    purging.add_argument("--dry-run", action="store_true", help="only say what it would do")
    purging.add_argument("--replayed", action="store_true", help="include replayed ones")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_file: Path | None = getattr(args, "config", None)
    if config_file is None and os.environ.get("RELAY_CONFIG_FILE"):
        config_file = Path(os.environ["RELAY_CONFIG_FILE"])
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2, sort_keys=True))
        return 0
    if args.command == "asyncapi":
        return _asyncapi()

    from relay import plugins

    # Warnings while loading (a world-readable secret file) need a handler before the
    # configured one exists.
    setup_logging("WARNING", "console" if args.command != "run" else _log_format())
    try:
        settings = plugins.load(config_file)
        if args.command in ("run", "check-config"):
            settings.check_paths()
    except ConfigError as exc:
        print(f"docker-event-relay: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        sinks = settings.sinks
        names = (
            ", ".join(f"{s.sink_name} ({getattr(s, 'type', '?')})" for s in sinks)
            or f"{plugins.DEFAULT_SINK} (default)"
        )
        print(f"configuration OK: sinks: {names}")
        return 0
    if args.command == "dead-letter":
        return _dead_letter(args, settings.state_dir / "spool.db")

    setup_logging(settings.log.level, settings.log.format)
    from relay.app import serve

    built = plugins.build_sinks(settings)
    # What is loaded by now (modules, settings, sinks) lives as long as the process. A full
    # collection walked all of it, ~50 ms here with the client libraries imported, every few
    # seconds at 500 events/s: that pause was the tail of the delivery latency. Frozen, the
    # collector skips it; what the sinks import when they connect is little next to it.
    gc.freeze()
    try:
        return asyncio.run(serve(settings, built))
    except KeyboardInterrupt:
        return 130


def _asyncapi() -> int:
    from relay import asyncapi, plugins

    try:
        channels = plugins.event_channels()
    except ConfigError as exc:
        print(f"docker-event-relay: configuration error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(asyncapi.render(asyncapi.document(channels)))
    return 0


def _log_format() -> str:
    """The log format asked for in the environment, before the settings are read."""
    wanted = os.environ.get("RELAY_LOG__FORMAT", "json")
    return wanted if wanted in ("json", "console") else "json"


def _dead_letter(args: argparse.Namespace, spool: Path) -> int:
    import sqlite3

    from relay import deadletter

    selection = deadletter.Selection(
        sink=args.sink,
        reason=args.reason,
        since=args.since,
        until=args.until,
        replayed=getattr(args, "replayed", False),
    )
    try:
        if args.action == "list":
            for letter in deadletter.select(spool, selection):
                print(_show(letter, as_json=args.json))
            return 0
        act = deadletter.replay if args.action == "replay" else deadletter.purge
        done = act(spool, selection, dry_run=args.dry_run)
    except (OSError, sqlite3.Error) as exc:
        print(f"docker-event-relay: {spool}: {exc}", file=sys.stderr)
        return 1
    verb = {"replay": "replayed", "purge": "purged"}[args.action]
    for letter in done:
        print(_show(letter, as_json=False))
    if args.action == "replay":
        skipped = "" if done else " (malformed engine lines have no sink to go to)"
        print(f"{'would be ' if args.dry_run else ''}{verb}: {len(done)}{skipped}")
    else:
        print(f"{'would be ' if args.dry_run else ''}{verb}: {len(done)}")
    return 0


def _show(letter: object, *, as_json: bool) -> str:
    from relay.deadletter import Letter

    assert isinstance(letter, Letter)
    if as_json:
        return json.dumps(
            {"id": letter.id, "replayed": letter.replayed, **letter.record}, sort_keys=True
        )
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(letter.time))
    event = letter.event
    what = f"{event.get('type')} {event.get('subject')} {event.get('id')}" if event else "(line)"
    error = str(letter.record.get("error", ""))
    done = " replayed" if letter.replayed else ""
    return f"{letter.id}\t{when}\t{letter.sink or '-'}\t{letter.reason}{done}\t{what}\t{error}"
