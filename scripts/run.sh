#!/usr/bin/env bash
# Run the relay's main job on this machine, with all set-up done first.
#
#   bash scripts/run.sh [docker-event-relay options...]     (default: run)
#
# It installs what the relay needs (scripts/setup.sh), then relays the events of the engine at
# DOCKER_HOST, or of /var/run/docker.sock when that answers. When neither answers (a fresh
# machine with nothing running), it starts a private Docker Engine under .cache/run-engine
# and relays its events; drive that engine from another shell with the DOCKER_HOST it prints.
# Events go to stdout as CloudEvents JSON lines (set RELAY_SINKS or --config for Kafka, MQTT,
# webhooks); logs go to stderr. Ctrl-C or SIGTERM stops it cleanly.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

bash scripts/setup.sh >&2

answers() { "$(bash scripts/engine.sh cli)" -H "$1" version >/dev/null 2>&1; }

private=""
if [[ -n ${DOCKER_HOST:-} ]] && answers "$DOCKER_HOST"; then
    printf '[run] relaying the engine at %s\n' "$DOCKER_HOST" >&2
elif [[ -z ${DOCKER_HOST:-} && -S /var/run/docker.sock ]] && answers unix:///var/run/docker.sock; then
    export DOCKER_HOST=unix:///var/run/docker.sock
    printf '[run] relaying the engine at %s\n' "$DOCKER_HOST" >&2
else
    private="$REPO/.cache/run-engine"
    mkdir -p "$private"
    bash scripts/engine.sh start "$private" >&2
    export DOCKER_HOST="unix://$private/docker.sock"
    cat >&2 <<EOM
[run] no engine was running: started a private one. In another shell, try:
[run]   DOCKER_HOST=$DOCKER_HOST docker run --rm --network none busybox:latest echo hi
EOM
fi

export RELAY_STATE_DIR="${RELAY_STATE_DIR:-$REPO/.cache/run-state}"
export RELAY_LOG__FORMAT="${RELAY_LOG__FORMAT:-console}"

status=0
if [[ $# -eq 0 ]]; then set -- run; fi
.venv/bin/docker-event-relay "$@" || status=$?
if [[ -n $private ]]; then
    bash scripts/engine.sh stop "$private" >&2 || true
fi
exit "$status"
