"""`docker-event-relay run | check-config | schema`. Exit 2 on a bad config, naming the setting."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from relay.errors import ConfigError
from relay.logs import setup_logging
from relay.schema import json_schema


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="docker-event-relay",
        description="Relay Docker Engine events as CloudEvents to Kafka, MQTT and webhooks.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("RELAY_CONFIG_FILE") or None,
        help="YAML settings file (env: RELAY_CONFIG_FILE); environment variables override it",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="relay events until SIGTERM")
    sub.add_parser("check-config", help="validate the settings; exit 0 if valid, 2 if not")
    sub.add_parser("schema", help="print the JSON Schema of the v1 event")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2, sort_keys=True))
        return 0

    from relay import plugins

    try:
        settings = plugins.load(args.config)
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

    setup_logging(settings.log.level, settings.log.format)
    from relay.app import serve

    try:
        return asyncio.run(serve(settings, plugins.build_sinks(settings)))
    except KeyboardInterrupt:
        return 130
