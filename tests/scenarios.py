"""Engine scenarios shared by the integration tests: things to do to a real engine, and what
the engine itself says happened."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from typing import Any

from tests.harness import PrivateEngine
from tests.harness.engine import ENGINE_SH

PRUNED_TYPES = ("container", "network", "volume", "image", "builder")


def ensure_busybox(engine: PrivateEngine) -> None:
    """busybox:latest again (a prune with -a removes it)."""
    subprocess.run(
        [str(ENGINE_SH), "ready", str(engine.workdir)], check=True, capture_output=True, timeout=120
    )


def engine_id(engine: PrivateEngine) -> str:
    """The engine's ID from /info: the `source` of its events and part of every event id."""
    return engine.cli("info", "--format", "{{.ID}}").stdout.strip()


def engine_time(engine: PrivateEngine) -> str:
    """The engine's clock as a `since`/`until` value (the test and engine share one host)."""
    return f"{time.time():.9f}"


def engine_events(
    engine: PrivateEngine, since: str, until: str, *filters: str
) -> list[dict[str, Any]]:
    """What the engine's own `docker events` reports for a past window (its 256-event ring)."""
    args = ["events", "--since", since, "--until", until, "--format", "{{json .}}"]
    for f in filters:
        args += ["--filter", f]
    out = engine.cli(*args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def prune_scenario(engine: PrivateEngine) -> dict[str, int]:
    """The scenario of the engine's prune-events change: networks, volumes, a container that
    writes 5 MiB into itself and into a volume, an image committed from it (a 5 MiB layer),
    extra image tags; then `docker system prune -af --volumes`, and busybox back. Returns
    reclaimed bytes per type as the engine itself reported them in its prune events: container
    and volume 5 MiB, image at least 5 MiB, network 0."""
    tag = uuid.uuid4().hex[:8]
    ensure_busybox(engine)
    since = engine_time(engine)
    engine.cli("network", "create", f"net-{tag}")
    engine.cli("volume", "create", f"vol-{tag}")
    # An anonymous volume: engines with API >= 1.42 prune only anonymous ones by default.
    engine.cli(
        "run",
        "--network",
        "none",
        "--name",
        f"writer-{tag}",
        "-v",
        "/data",
        "busybox:latest",
        "sh",
        "-c",
        "dd if=/dev/zero of=/data/f bs=1M count=5 2>/dev/null && "
        "dd if=/dev/zero of=/f bs=1M count=5 2>/dev/null",
    )
    engine.cli("commit", f"writer-{tag}", f"relay-test/layer-{tag}:1")
    engine.cli("tag", "busybox:latest", f"relay-test/extra-{tag}:1")
    engine.cli("tag", "busybox:latest", f"relay-test/extra-{tag}:2")
    engine.cli("system", "prune", "-af", "--volumes")
    until = engine_time(engine)
    ensure_busybox(engine)
    reported = engine_events(engine, since, until, "event=prune")
    reclaimed = {e["Type"]: int(e["Actor"]["Attributes"]["reclaimed"]) for e in reported}
    assert set(reclaimed) == set(PRUNED_TYPES), f"engine reported prunes for {sorted(reclaimed)}"
    return reclaimed


_CREATE_VOLUMES = """
import asyncio, sys, aiodocker
host, label, names = sys.argv[1], sys.argv[2], sys.stdin.read().split()
async def main():
    async with aiodocker.Docker(url=host) as docker:
        sem = asyncio.Semaphore(32)
        async def one(name):
            async with sem:
                await docker.volumes.create({"Name": name, "Labels": {"burst": label}})
        await asyncio.gather(*(one(n) for n in names))
asyncio.run(main())
"""


def create_volumes(engine: PrivateEngine, names: list[str], label: str) -> None:
    """Create volumes as fast as the engine allows, from another process (as a busy host's
    other clients would: the relay under test must not share a CPU-bound thread with them)."""
    subprocess.run(
        [sys.executable, "-c", _CREATE_VOLUMES, engine.docker_host, label],
        input="\n".join(names),
        text=True,
        check=True,
        timeout=300,
    )
