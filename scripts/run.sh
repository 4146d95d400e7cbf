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
# webhooks); logs go to stderr.
#
# Ctrl-C, SIGTERM (`timeout`, `kill`) or SIGHUP stops it cleanly: the relay drains and exits,
# then the private engine (if this script started one) is stopped, containerd with it. The
# engine is also stopped when the relay exits on its own. A second signal while the relay
# drains stops the relay at once (SIGKILL); the engine is still stopped.
#
# Environment: RUN_SKIP_SETUP=1 skips scripts/setup.sh (it is idempotent but takes seconds);
# RUN_ENGINE_DIR replaces .cache/run-engine as the private engine's directory.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

say() { printf '[run] %s\n' "$*" >&2 2>/dev/null || true; }

private=""  # the private engine's directory, once this script starts one
child=""    # the background process the script waits for (engine start, then the relay)
caught=""   # the first signal received

# Bash runs a trap only once the foreground command ends, and a signal sent to this script
# alone (`kill PID`) never reaches that command. So the engine start and the relay run in the
# background, and the script waits for them with `wait`, which a trapped signal interrupts: the
# trap passes the signal on at once.
on_signal() {
    local sig=$1
    if [[ -z $caught ]]; then
        caught=$sig
        say "SIG$sig: stopping"
        if [[ -n $child ]]; then kill -TERM "$child" 2>/dev/null || true; fi
    else
        say "SIG$sig again: stopping at once"
        if [[ -n $child ]]; then kill -KILL "$child" 2>/dev/null || true; fi
    fi
}

# Wait for the background child until it has exited (a trapped signal returns early from
# `wait`); its exit status is the function's.
wait_child() {
    local rc=0
    while :; do
        rc=0
        wait "$child" || rc=$?
        kill -0 "$child" 2>/dev/null || break
    done
    child=""
    return "$rc"
}

# Processes of the private engine still alive: dockerd, its containerd and the shims name the
# directory in their command lines. engine.sh stop ends them through their pid files; this
# catches what a signal during the engine's start left without one.
engine_leftovers() {
    local proc pid cmdline args
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        [[ $pid != "$$" ]] || continue
        mapfile -d '' args 2>/dev/null <"$proc/cmdline" || continue
        cmdline="${args[*]} "
        case "$cmdline" in
            *"--pidfile $private/docker.pid"* | *" $private/exec/"* | *"engine.sh run $private "*)
                printf '%s\n' "$pid"
                ;;
        esac
    done
}

stop_engine() {
    local pids deadline
    bash scripts/engine.sh stop "$private" >&2 || true
    pids="$(engine_leftovers)"
    if [[ -n $pids ]]; then
        # shellcheck disable=SC2086 # one pid per word
        kill -TERM $pids 2>/dev/null || true
        deadline=$((SECONDS + ${ENGINE_STOP_TIMEOUT:-30}))
        while [[ -n "$(engine_leftovers)" ]] && ((SECONDS < deadline)); do sleep 0.1; done
        pids="$(engine_leftovers)"
        # shellcheck disable=SC2086 # one pid per word
        if [[ -n $pids ]]; then kill -KILL $pids 2>/dev/null || true; fi
    fi
    unmount_leftovers
}

# dockerd bind-mounts its data root onto itself and unmounts it as it shuts down; stopped
# before it got that far (a signal while it started), it leaves the mount behind.
unmount_leftovers() {
    local mounts=() mnt i
    while read -r _ mnt _; do
        if [[ $mnt == "$private"/* ]]; then mounts+=("$mnt"); fi
    done </proc/mounts
    # Deepest first.
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        umount "${mounts[i]}" 2>/dev/null || umount -l "${mounts[i]}" 2>/dev/null || true
    done
}

cleanup() {
    local rc=$?
    set +e
    # Ignored from here on, by the engine's stop too: a second Ctrl-C must not cut it short.
    trap '' INT TERM HUP
    if [[ -n $child ]]; then
        kill -TERM "$child" 2>/dev/null
        wait_child
    fi
    if [[ -n $private ]]; then
        say "stopping the private engine"
        stop_engine
    fi
    exit "$rc"
}

trap cleanup EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

exit_if_signalled() {
    case "$caught" in
        INT) exit 130 ;;
        HUP) exit 129 ;;
        TERM) exit 143 ;;
    esac
}

if [[ ${RUN_SKIP_SETUP:-} != 1 ]]; then
    # In the foreground: Ctrl-C reaches apt and pip; it starts no process that outlives it.
    bash scripts/setup.sh >&2
fi
exit_if_signalled

answers() { "$(bash scripts/engine.sh cli)" -H "$1" version >/dev/null 2>&1; }

if [[ -n ${DOCKER_HOST:-} ]] && answers "$DOCKER_HOST"; then
    say "relaying the engine at $DOCKER_HOST"
elif [[ -z ${DOCKER_HOST:-} && -S /var/run/docker.sock ]] && answers unix:///var/run/docker.sock; then
    export DOCKER_HOST=unix:///var/run/docker.sock
    say "relaying the engine at $DOCKER_HOST"
else
    private="${RUN_ENGINE_DIR:-$REPO/.cache/run-engine}"
    mkdir -p "$private"
    private="$(cd "$private" && pwd)"
    exit_if_signalled
    bash scripts/engine.sh start "$private" >&2 &
    child=$!
    started=0
    wait_child || started=$?
    exit_if_signalled
    if ((started != 0)); then exit "$started"; fi
    export DOCKER_HOST="unix://$private/docker.sock"
    cat >&2 <<EOM
[run] no engine was running: started a private one. In another shell, try:
[run]   DOCKER_HOST=$DOCKER_HOST docker run --rm --network none busybox:latest echo hi
EOM
fi
exit_if_signalled

export RELAY_STATE_DIR="${RELAY_STATE_DIR:-$REPO/.cache/run-state}"
export RELAY_LOG__FORMAT="${RELAY_LOG__FORMAT:-console}"

status=0
if [[ $# -eq 0 ]]; then set -- run; fi
.venv/bin/docker-event-relay "$@" &
child=$!
wait_child || status=$?
# The relay's own status, also after a signal: 0 when it stopped cleanly.
exit "$status"
