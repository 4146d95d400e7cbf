#!/usr/bin/env bash
# The whole test suite, with all set-up done first (a fresh machine of this kind needs nothing
# else): lint, types, unit tests, and integration tests against real engines (Docker 20.10 and
# 28.5), a real Kafka-protocol broker (tansu), real Mosquitto and real HTTP servers, all
# started by the tests themselves.
#
#   bash scripts/test.sh [pytest options...]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

bash scripts/setup.sh

echo "[test] ruff" >&2
.venv/bin/ruff check relay sinks tests bench examples scripts
.venv/bin/ruff format --check relay sinks tests bench examples scripts
echo "[test] mypy --strict relay sinks, and the example plugin" >&2
.venv/bin/mypy
.venv/bin/mypy --strict examples/sink-plugin/relay_sink_jsonl
echo "[test] pytest" >&2
exec .venv/bin/pytest -p no:cacheprovider "$@"
