#!/usr/bin/env bash
# One-shot, idempotent set-up of a fresh Debian 12 machine for development and CI:
#   * Debian packages: the 20.10 Docker Engine, busybox-static (for the test image),
#     debootstrap (a local base for the container image test),
#     mosquitto, stunnel4 and openssl (TLS tests), prometheus (promtool and a real server
#     for the alert rule and dashboard tests), mosquitto-clients (mosquitto_pub, the plain
#     tool bench/bench_vs_plain.py measures the relay against);
#   * the project's virtualenv in .venv with the [test,bench] extras (ships tansu and the
#     local S3 tansu keeps data in), and the example sink plugin (examples/sink-plugin);
#   * Debian forky's Docker Engine 28.5 unpacked under .cache/engines/forky/ without
#     touching the system's apt state (DESIGN.md section 5);
#   * the AsyncAPI parser (npm @asyncapi/parser, pinned) under .cache/asyncapi/, which the
#     tests run with Node to validate schemas/asyncapi.yaml.
# It needs no running service and starts none.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

log() { printf '[setup] %s\n' "$*" >&2; }

# --- 1. Debian packages -------------------------------------------------------------------
APT_PACKAGES=(docker.io busybox-static mosquitto stunnel4 openssl debootstrap prometheus
    mosquitto-clients podman)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    # dpkg -s also succeeds for "deinstall" leftovers, so look at the status line itself.
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    # A policy-rc.d that answers 101 keeps invoke-rc.d from starting the system dockerd,
    # containerd, mosquitto or prometheus while the packages install: the tests start private
    # instances and a system daemon would only hold ports and /run/docker.sock.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
    fi
    drop_policy() { if ((own_policy)); then rm -f "$policy"; fi; }
    trap drop_policy EXIT
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
    drop_policy
    trap - EXIT
else
    log "apt packages already installed"
fi

# The system daemons must never auto-start (there is no systemd here, but sysvinit links
# exist and a machine of another kind might boot them). Disabling is idempotent.
for svc in docker containerd mosquitto stunnel4 prometheus; do
    if [[ -e /etc/init.d/$svc ]] && command -v update-rc.d >/dev/null; then
        update-rc.d "$svc" disable >/dev/null 2>&1 || true
    fi
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
done

# --- 2. Python virtualenv -----------------------------------------------------------------
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    python3 -m venv .venv
fi
# Re-install only when pyproject.toml changed: a no-op pip run still costs seconds.
stamp=.venv/.setup-pyproject.sha256
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
    log "pip install -e .[test,bench]"
    .venv/bin/pip install -q -e '.[test,bench]'
    printf '%s\n' "$want" >"$stamp"
else
    log ".venv up to date"
fi
# The example sink plugin: the test suite runs the sink contract against it and checks that
# the relay finds it through its entry point. --no-deps: what it needs (the relay, pydantic) is
# what was installed just above, never a package of that name from an index.
plugin_stamp=.venv/.setup-plugin-pyproject.sha256
plugin_want="$(sha256sum examples/sink-plugin/pyproject.toml | cut -d' ' -f1)"
if [[ ! -f $plugin_stamp || "$(cat "$plugin_stamp")" != "$plugin_want" ]]; then
    log "pip install -e examples/sink-plugin"
    .venv/bin/pip install -q --no-deps -e examples/sink-plugin
    printf '%s\n' "$plugin_want" >"$plugin_stamp"
else
    log "example sink plugin up to date"
fi

# --- 3. Debian forky's Docker Engine 28.5 -------------------------------------------------
# Why these packages: forky's dockerd links only against libraries bookworm has, and its
# containerd 2.1 is a static-enough Go binary that runs here too, so the engine gets the
# containerd it was built and tested with. Forky's runc, however, needs glibc 2.38
# (bookworm has 2.36) and fails to start, so the engine uses the system runc 1.1.5 from
# bookworm instead (it speaks the same OCI runtime CLI). tini-static provides
# docker-init, docker-cli a 28.5 client that needs no /usr/local/bin/docker.
FORKY="$REPO/.cache/engines/forky"
FORKY_PACKAGES=(docker.io containerd tini-static docker-cli)

forky_ok() {
    [[ -x $FORKY/bin/dockerd && -x $FORKY/bin/containerd && -x $FORKY/bin/docker ]] &&
        "$FORKY/bin/dockerd" --version >/dev/null 2>&1 &&
        "$FORKY/bin/containerd" --version >/dev/null 2>&1
}

if forky_ok; then
    log "forky engine already cached: $("$FORKY/bin/dockerd" --version)"
else
    log "fetching forky docker.io into $FORKY"
    rm -rf "$FORKY"
    mkdir -p "$FORKY/apt/lists/partial" "$FORKY/apt/cache/archives/partial" "$FORKY/debs"
    sources=/etc/apt/sources.list.d/debian.sources
    uri="$(awk '/^URIs:/{print $2; exit}' "$sources")"
    keyring="$(awk '/^Signed-By:/{print $2; exit}' "$sources")"
    keyring="${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}"
    printf 'deb [signed-by=%s] %s forky main\n' "$keyring" "$uri" >"$FORKY/apt/forky.list"
    # Every path apt writes to is redirected into the cache: the list files, and the
    # binary package cache (pkgcache.bin would otherwise land in /var/cache/apt and
    # mix forky into the system's view). The sandbox user is root because _apt cannot
    # write into a root-owned cache directory.
    apt_opts=(
        -o "Dir::Etc::SourceList=$FORKY/apt/forky.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$FORKY/apt/lists"
        -o "Dir::Cache=$FORKY/apt/cache"
        -o "APT::Sandbox::User=root"
    )
    apt-get "${apt_opts[@]}" update
    (cd "$FORKY/debs" && apt-get "${apt_opts[@]}" download "${FORKY_PACKAGES[@]}")
    for deb in "$FORKY"/debs/*.deb; do
        dpkg -x "$deb" "$FORKY/root"
    done
    # bin/ is the PATH dockerd starts with (scripts/engine.sh puts the dockerd's own
    # directory first), so it decides which containerd, shim, runc and docker-init the
    # engine uses.
    mkdir -p "$FORKY/bin"
    ln -sf ../root/usr/sbin/dockerd "$FORKY/bin/dockerd"
    ln -sf ../root/usr/sbin/docker-proxy "$FORKY/bin/docker-proxy"
    ln -sf ../root/usr/bin/containerd "$FORKY/bin/containerd"
    ln -sf ../root/usr/bin/containerd-shim-runc-v2 "$FORKY/bin/containerd-shim-runc-v2"
    ln -sf ../root/usr/bin/tini-static "$FORKY/bin/docker-init"
    ln -sf ../root/usr/bin/docker "$FORKY/bin/docker"
    ln -sf /usr/sbin/runc "$FORKY/bin/runc"
    forky_ok || { log "forky engine unpacked but does not run"; exit 1; }
    # The unpacked tree is all that is needed; the .debs and lists are 70 MB of dead weight.
    rm -rf "$FORKY/debs" "$FORKY/apt"
    version="$("$FORKY/bin/dockerd" --version)"
    printf '%s\n' "$version" >"$FORKY/VERSION"
    case "$version" in
        *" 28.5."*) log "cached $version" ;;
        *) log "WARNING: forky now carries '$version', the tests expect 28.5 (API 1.51)" ;;
    esac
fi

# --- 4. The AsyncAPI parser ----------------------------------------------------------------
# The reference parser the AsyncAPI tools are built on, so the tests check schemas/asyncapi.yaml
# as those tools read it (tests/asyncapi/validate.mjs). Pinned; its own dependencies as npm
# resolves them within the parser's ranges. --ignore-scripts: no install script runs (one
# dependency's only reports usage analytics).
ASYNCAPI_PARSER_VERSION=3.6.6
ASYNCAPI="$REPO/.cache/asyncapi"

asyncapi_ok() {
    [[ "$(node -p 'require(process.argv[1]).version' \
        "$ASYNCAPI/node_modules/@asyncapi/parser/package.json" 2>/dev/null)" == \
        "$ASYNCAPI_PARSER_VERSION" ]]
}

if ! command -v npm >/dev/null; then
    log "installing nodejs and npm"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm
fi
if asyncapi_ok; then
    log "@asyncapi/parser $ASYNCAPI_PARSER_VERSION already installed"
else
    log "npm install @asyncapi/parser@$ASYNCAPI_PARSER_VERSION into $ASYNCAPI"
    rm -rf "$ASYNCAPI"
    mkdir -p "$ASYNCAPI"
    printf '{"name": "asyncapi-validate", "private": true}\n' >"$ASYNCAPI/package.json"
    npm install --prefix "$ASYNCAPI" --ignore-scripts --no-audit --no-fund --omit=dev \
        --loglevel=error "@asyncapi/parser@$ASYNCAPI_PARSER_VERSION"
    asyncapi_ok || { log "@asyncapi/parser installed but does not load"; exit 1; }
fi

log "done"
