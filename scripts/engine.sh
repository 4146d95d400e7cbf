#!/usr/bin/env bash
# Private Docker Engines for tests and local experiments (DESIGN.md section 5).
#
#   scripts/engine.sh start DIR [DOCKERD]   start in the background, wait, import busybox:latest,
#                                           print DOCKER_HOST=unix://DIR/docker.sock
#   scripts/engine.sh stop DIR              SIGTERM dockerd (and its containerd), wait for exit
#   scripts/engine.sh run DIR [DOCKERD]     exec dockerd in the foreground (the Python harness
#                                           uses this so that it owns the process)
#   scripts/engine.sh ready DIR [PID]       wait until the socket answers and the image exists;
#                                           fail early if PID (the dockerd) dies meanwhile
#   scripts/engine.sh cli                   print the docker client this script uses
#   scripts/engine.sh busybox-tar DIR       build DIR/busybox-image.tar (once), print its path
#                                           (the Podman harness imports the same rootfs)
#
# DOCKERD defaults to /usr/sbin/dockerd (Debian 12: 20.10); the forky 28.5 engine fetched by
# scripts/setup.sh is .cache/engines/forky/bin/dockerd. Each engine gets its own containerd:
# dockerd starts ("supervises") one itself when not given --containerd, with its socket, state
# and pid file under DIR/exec/containerd and its content under DIR/root/containerd, so several
# engines run side by side without sharing anything but the kernel.
#
# Environment: ENGINE_START_TIMEOUT (s, default 60), ENGINE_STOP_TIMEOUT (s, default 30),
# DOCKER_CLI (client binary override), ENGINE_EXTRA_ARGS (more dockerd flags, for `run`).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$REPO/scripts/engine.sh"
POLL_INTERVAL=0.1

die() { printf 'engine.sh: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,16p' "$SELF" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# The client must work against API 1.41 and 1.51 alike. A 28.x client negotiates down to
# 1.41 with the 20.10 engine; the 20.10 client would cap the 28.5 engine at API 1.41 and hide
# its newer behaviour. So prefer the forky 28.5 client, then the 28.2 one of this machine
# kind, and only then Debian 12's 20.10 client.
docker_cli() {
    local candidate
    for candidate in "${DOCKER_CLI:-}" "$REPO/.cache/engines/forky/bin/docker" \
        /usr/local/bin/docker /usr/bin/docker; do
        if [[ -n $candidate && -x $candidate ]]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    die "no docker client found (run scripts/setup.sh)"
}

# kill -0 also succeeds for a zombie that its parent has not reaped yet (e.g. the Python
# harness between SIGTERM and wait()), so a process counts as alive only if not in state Z.
alive() {
    local pid=$1 stat
    [[ -n $pid ]] || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ ${stat:0:1} != Z ]]
}

abs_dir() {
    [[ -n ${1:-} ]] || usage
    mkdir -p "$1"
    (cd "$1" && pwd)
}

cmd_run() {
    local dir dockerd
    dir="$(abs_dir "${1:-}")"
    dockerd="${2:-/usr/sbin/dockerd}"
    [[ -x $dockerd ]] || die "dockerd not found: $dockerd (run scripts/setup.sh)"
    # Absolute, but without resolving symlinks: the PATH below must name the directory the
    # dockerd was given in (.cache/engines/forky/bin), and dockerd wants an absolute PATH.
    dockerd="$(cd "$(dirname "$dockerd")" && pwd)/$(basename "$dockerd")"
    mkdir -p "$dir/root" "$dir/exec"
    # dockerd finds containerd, containerd-shim-runc-v2, runc and docker-init on PATH; putting
    # the directory of the chosen dockerd first makes each engine use its own companions
    # (for forky: containerd 2.1 from the cache, bookworm's runc; see scripts/setup.sh).
    PATH="$(dirname "$dockerd"):/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    export PATH
    # ENGINE_EXTRA_ARGS: more dockerd flags, e.g. a TLS-protected tcp:// listener for tests.
    # shellcheck disable=SC2086 # word splitting intended: one flag per word
    exec "$dockerd" ${ENGINE_EXTRA_ARGS:-} \
        --host "unix://$dir/docker.sock" \
        --data-root "$dir/root" \
        --exec-root "$dir/exec" \
        --pidfile "$dir/docker.pid" \
        --iptables=false --ip6tables=false --bridge=none \
        --storage-driver=vfs
}

# A tar with /bin/busybox and one symlink per applet: enough for `sh -c`, sleep, etc. Built once
# per engine directory; busybox-static has no library dependencies, so nothing else is needed.
busybox_tar() {
    local dir=$1 tar="$1/busybox-image.tar" stage applet
    if [[ ! -s $tar ]]; then
        [[ -x /bin/busybox ]] || die "/bin/busybox missing (apt-get install busybox-static)"
        stage="$(mktemp -d "$dir/busybox-stage.XXXXXX")"
        mkdir -p "$stage/bin" "$stage/tmp"
        cp /bin/busybox "$stage/bin/busybox"
        for applet in $(/bin/busybox --list); do
            [[ $applet == busybox ]] || ln -s busybox "$stage/bin/$applet"
        done
        tar -C "$stage" -cf "$tar.partial" .
        mv "$tar.partial" "$tar"
        rm -rf "$stage"
    fi
    printf '%s\n' "$tar"
}

cmd_ready() {
    local dir pid deadline cli host
    dir="$(abs_dir "${1:-}")"
    pid="${2:-}"
    cli="$(docker_cli)"
    host="unix://$dir/docker.sock"
    deadline=$((SECONDS + ${ENGINE_START_TIMEOUT:-60}))
    until "$cli" -H "$host" version >/dev/null 2>&1; do
        if [[ -n $pid ]] && ! alive "$pid"; then
            tail -n 20 "$dir/dockerd.log" >&2 2>/dev/null || true
            die "dockerd (pid $pid) exited before $host answered; see $dir/dockerd.log"
        fi
        ((SECONDS < deadline)) || die "timed out waiting for $host; see $dir/dockerd.log"
        sleep "$POLL_INTERVAL"
    done
    if ! "$cli" -H "$host" image inspect busybox:latest >/dev/null 2>&1; then
        "$cli" -H "$host" import "$(busybox_tar "$dir")" busybox:latest >/dev/null
    fi
}

cmd_start() {
    local dir dockerd pid=""
    dir="$(abs_dir "${1:-}")"
    dockerd="${2:-/usr/sbin/dockerd}"
    if [[ -f $dir/docker.pid ]] && alive "$(cat "$dir/docker.pid")"; then
        pid="$(cat "$dir/docker.pid")"
    else
        # setsid: the engine must outlive this shell and not get its terminal's SIGINT.
        setsid "$SELF" run "$dir" "$dockerd" >>"$dir/dockerd.log" 2>&1 </dev/null &
        pid=$!
    fi
    cmd_ready "$dir" "$pid"
    printf 'DOCKER_HOST=unix://%s/docker.sock\n' "$dir"
}

# SIGTERM, then poll until the pid is gone; SIGKILL only after the deadline, and say so.
terminate() {
    local pid=$1 what=$2 deadline
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    deadline=$((SECONDS + ${ENGINE_STOP_TIMEOUT:-30}))
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            printf 'engine.sh: %s (pid %s) ignored SIGTERM, killing it\n' "$what" "$pid" >&2
            kill -KILL "$pid" 2>/dev/null || true
            return 0
        fi
        sleep "$POLL_INTERVAL"
    done
}

cmd_stop() {
    local dir pid="" cpid=""
    dir="$(abs_dir "${1:-}")"
    [[ -f $dir/docker.pid ]] && pid="$(cat "$dir/docker.pid")"
    # Read containerd's pid before dockerd goes: dockerd removes the file when it stops it.
    [[ -f $dir/exec/containerd/containerd.pid ]] && cpid="$(cat "$dir/exec/containerd/containerd.pid")"
    if [[ -n $pid ]]; then
        terminate "$pid" dockerd
    fi
    # dockerd normally stops its containerd itself; this only matters after a SIGKILL.
    if [[ -n $cpid ]]; then
        terminate "$cpid" containerd
    fi
    rm -f "$dir/docker.pid"
    # dockerd leaves its network namespace files bind-mounted; unmounted, the directory can go.
    local ns
    for ns in "$dir"/exec/netns/*; do
        if mountpoint -q "$ns" 2>/dev/null; then umount "$ns" 2>/dev/null || true; fi
    done
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    run) shift; cmd_run "$@" ;;
    ready) shift; cmd_ready "$@" ;;
    cli) docker_cli ;;
    busybox-tar) shift; [[ $# -eq 1 ]] || usage; busybox_tar "$1" ;;
    *) usage ;;
esac
