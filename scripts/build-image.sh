#!/usr/bin/env bash
# Build the relay's container image without any registry (DESIGN.md section 5: none is
# reachable here), the way CI or an air-gapped site can:
#
#   scripts/build-image.sh [TAG]        default TAG: docker-event-relay:dev
#
# 1. A base image made locally: Debian bookworm from Debian's packages (debootstrap, minbase,
#    with python3 and python3-venv), imported with `docker import` as docker-event-relay-base:
#    bookworm. Skipped when BASE_IMAGE is given (e.g. python:3.11.13-slim-bookworm from a
#    registry) or the base image exists already.
# 2. The wheels of the project and its dependencies, built on this host with its own pip
#    settings, served on a loopback port; the build reaches them through the host network
#    (legacy builder: `docker build --network host`), so nothing in the image needs this
#    host's index or certificates.
# 3. `docker build` with BASE_IMAGE and PIP_NO_INDEX/PIP_FIND_LINKS as build arguments.
#
# Environment: DOCKER_HOST (the engine to build with, e.g. a private one from
# scripts/engine.sh), BASE_IMAGE, DEBIAN_MIRROR (default: this machine's apt source),
# WORK (scratch directory, default .cache/image).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
TAG="${1:-docker-event-relay:dev}"
WORK="${WORK:-$REPO/.cache/image}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
DOCKER="${DOCKER:-$(scripts/engine.sh cli)}"

log() { printf '[build-image] %s\n' "$*" >&2; }

mkdir -p "$WORK"

if [[ -z ${BASE_IMAGE:-} ]]; then
    BASE_IMAGE=docker-event-relay-base:bookworm
    if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        if [[ ! -x $WORK/rootfs/usr/bin/python3 ]]; then
            command -v debootstrap >/dev/null || {
                log "installing debootstrap"
                DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap
            }
            mirror="${DEBIAN_MIRROR:-$(awk '/^URIs:/{print $2; exit}' \
                /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}"
            mirror="${mirror:-http://deb.debian.org/debian}"
            log "debootstrap bookworm from $mirror into $WORK/rootfs"
            rm -rf "$WORK/rootfs"
            debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
                bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log"
            # What an image needs no more: package caches, indexes, docs, translations.
            rm -rf "$WORK/rootfs"/var/cache/apt/archives/*.deb "$WORK/rootfs"/var/lib/apt/lists/* \
                "$WORK/rootfs"/usr/share/doc/* "$WORK/rootfs"/usr/share/man/* \
                "$WORK/rootfs"/usr/share/locale/* "$WORK/rootfs"/usr/share/info/*
        fi
        log "docker import $BASE_IMAGE"
        tar -C "$WORK/rootfs" --numeric-owner -c . | "$DOCKER" import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
    fi
fi

log "building wheels"
# From a copy: setuptools leaves build/ and *.egg-info beside the sources it builds.
rm -rf "$WORK/wheels" "$WORK/src"
mkdir -p "$WORK/src"
cp -r pyproject.toml relay sinks "$WORK/src/"
cp README* "$WORK/src/" 2>/dev/null || true
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
"$PYTHON" -m pip wheel --quiet --wheel-dir "$WORK/wheels" "$WORK/src" "setuptools>=68" wheel pip

port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WORK/wheels" "$port" \
    >"$WORK/wheel-server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" \
        2>/dev/null && break
    sleep 0.1
done

log "docker build $TAG (base $BASE_IMAGE)"
DOCKER_BUILDKIT=0 "$DOCKER" build --network host --tag "$TAG" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg PIP_NO_INDEX=1 \
    --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/" \
    .
"$DOCKER" image ls "$TAG"
