"""Which engine is at the other end of the socket, and the identity its events carry.

The identity is the `source` of every event, part of every event id, and the key under which
the spool keeps the cursor: it must stay the same across calls, reconnects and restarts of the
engine, or a reconnect looks like a new engine (its cursor dropped, nothing replayed) and the
same engine event gets a new id (consumers cannot dedupe it).

Docker's `/info` `ID` is such an identity. Podman's Docker-compatible `/info` answers a new
random `ID` on every call (4.3.1), so for Podman it is derived from what its `/info` says that
does not change: the host name and the storage root (`DockerRootDir`, Podman's graph root),
which also tells apart several Podman services (root and rootless users) on one host.
`engine.id` in the settings pins it for any engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Final

from relay.normalize import Flavour

# What `engine.id` may be: it is written into `source` (a URN), event ids and topic templates.
ENGINE_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
PODMAN_ID_PREFIX: Final = "podman-"


def flavour_of(version: Mapping[str, Any]) -> Flavour:
    """`podman` when `/version` names Podman, else `docker`.

    Podman 4.3.1 lists a component "Podman Engine" (its `Platform.Name` is the OS, e.g.
    "linux/amd64/debian-12"); Docker lists "Engine" and names itself in `Platform.Name`
    ("Docker Engine - Community", or empty on distribution builds). Both places are read, as
    later Podman versions may move the name.
    """
    names: list[object] = []
    components = version.get("Components")
    if isinstance(components, list):
        names.extend(c.get("Name") for c in components if isinstance(c, Mapping))
    platform = version.get("Platform")
    if isinstance(platform, Mapping):
        names.append(platform.get("Name"))
    for name in names:
        if isinstance(name, str) and "podman" in name.lower():
            return "podman"
    return "docker"


def podman_id(info: Mapping[str, Any]) -> str:
    """A stable identity for a Podman service: a hash of its host name and storage root."""
    host = info.get("Name")
    root = info.get("DockerRootDir")
    if not isinstance(root, str) or not root:
        raise ValueError("Podman's /info has no DockerRootDir to derive an id from: set engine.id")
    key = f"{host if isinstance(host, str) else ''}\x00{root}".encode()
    return PODMAN_ID_PREFIX + hashlib.sha256(key).hexdigest()[:32]


def engine_identity(info: Mapping[str, Any], flavour: Flavour, pinned: str | None) -> str:
    """The id the relay gives the engine: `pinned` when set (any engine), Podman's derived id,
    else the engine's own `/info` `ID` (empty when it has none: the caller refuses that)."""
    if pinned:
        return pinned
    if flavour == "podman":
        return podman_id(info)
    own = info.get("ID")
    return own if isinstance(own, str) else ""
