"""Redaction: what one sink must not receive. Per sink, labels and attributes are dropped or
replaced by a keyed hash, chosen by name or glob, and the exec command line is cut to what the
sink may see.

    redact:
      drop: ["labels.com.example.secret*", "attributes.comment"]
      hash: ["labels.owner"]
      key_file: /run/secrets/relay-redact-key
      exec_command: none

Where it happens: the sink port's `send` guard (`relay.sink`) hands the adapter a redacted copy
of each event the rule changes, and the very same object otherwise; a sink without a rule costs
nothing. Redaction is not done when the event is routed, because what a sink holds beyond its
in-memory window is read back from the spool, which keeps one copy of each event for every
sink: that copy is the unredacted one, on the relay's private disk (0600), as are dead letters.

A hash is `hmac-sha256:` and the first 32 hex digits of HMAC-SHA256(key, value as UTF-8). It
is keyed because the values worth hashing (a password, an owner, a tenant) often come from a
small space: an unkeyed hash of one is undone by hashing every candidate. With the key, equal
values still give equal hashes, so a destination can correlate without learning the value.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from fnmatch import translate
from pathlib import Path
from typing import Annotated, Final

import msgspec
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, model_validator

from relay.normalize import (
    EXEC_ACTIONS,
    EXEC_COMMAND_MODES,
    ExecCommandMode,
    context_of,
    exec_detail,
)
from relay.schema import Event
from relay.tls import resolve_secret_files

HASH_PREFIX: Final = "hmac-sha256:"
HASH_HEX_DIGITS: Final = 32  # 128 bits: no accidental collision among a relay's values
MIN_KEY_BYTES: Final = 32
MAPS: Final = ("labels", "attributes")
# Decisions remembered per key name; the names are chosen by whoever creates containers, so
# the memory is bounded (and forgotten whole when full).
_CACHE_MAX: Final = 4096

_KEEP: Final = 0
_DROP: Final = 1
_HASH: Final = 2


def _check_brackets(glob: str) -> None:
    """fnmatch reads an unclosed `[` as a literal bracket: a glob that meant a character class
    would silently match nothing."""
    i, n = 0, len(glob)
    while i < n:
        if glob[i] == "[":
            j = i + 1
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1  # a `]` first in the class is one of its characters
            close = glob.find("]", j)
            if close < 0:
                raise ValueError(f"unclosed '[' in the glob {glob!r}")
            i = close
        i += 1


def _selector(value: str) -> str:
    prefix, dot, glob = value.partition(".")
    if not dot or prefix not in MAPS:
        raise ValueError(
            f"{value!r}: a selector is labels.<name or glob> or attributes.<name or glob> "
            '(e.g. "labels.com.example.secret*")'
        )
    if not glob:
        raise ValueError(
            f"{value!r}: no name or glob after '{prefix}.' (all of them: '{prefix}.*')"
        )
    _check_brackets(glob)
    return value


Selector = Annotated[str, AfterValidator(_selector)]


class RedactSettings(BaseModel):
    """A sink's redaction rule; empty (the default): the sink gets events as they are."""

    model_config = ConfigDict(extra="forbid")

    drop: list[Selector] = Field(
        default_factory=list,
        description="Labels and attributes to remove, as labels.GLOB or attributes.GLOB "
        "(fnmatch, case-sensitive, over the whole name; e.g. labels.com.example.secret*).",
    )
    hash: list[Selector] = Field(
        default_factory=list,
        description="Labels and attributes whose value becomes hmac-sha256: and 32 hex digits "
        "of HMAC-SHA256(key, value); selectors as in drop, which wins where both match. "
        "Needs key.",
    )
    key: SecretStr | None = Field(
        default=None,
        description=f"HMAC key for hash, at least {MIN_KEY_BYTES} bytes (openssl rand -hex 32). "
        "Sinks that must correlate share it; others should not.",
    )
    key_file: Path | None = Field(default=None, description="File holding key.")
    exec_command: ExecCommandMode | None = Field(
        default=None,
        description="What of an exec_create/exec_start command line this sink receives in "
        "action_detail: full, program or none. Default: schema.exec_command.",
    )

    @model_validator(mode="after")
    def _check(self) -> RedactSettings:
        resolve_secret_files(self, ("key", "key_file"))
        both = sorted(set(self.drop) & set(self.hash))
        if both:
            raise ValueError(f"drop and hash: {both[0]!r} is in both; name it in one")
        if self.key is not None:
            size = len(self.key.get_secret_value().encode())
            if size < MIN_KEY_BYTES:
                raise ValueError(
                    f"key: {size} bytes; a hash key needs at least {MIN_KEY_BYTES} (a short "
                    "key can be guessed with the values): openssl rand -hex 32"
                )
        if self.hash and self.key is None:
            raise ValueError("hash: needs key or key_file (the HMAC key)")
        return self

    def compile(
        self, default_exec: ExecCommandMode, kept_exec: ExecCommandMode
    ) -> Redaction | None:
        """The rule to apply, or None when it changes nothing: no selectors, and the exec
        command as the normalizer keeps it (`kept_exec`, the most any sink gets)."""
        mode = self.exec_command or default_exec
        narrower = EXEC_COMMAND_MODES.index(mode) < EXEC_COMMAND_MODES.index(kept_exec)
        if not self.drop and not self.hash and not narrower:
            return None
        key = self.key.get_secret_value().encode() if self.key is not None else None
        return Redaction(self.drop, self.hash, key=key, exec_command=mode if narrower else None)


def most_kept(modes: Sequence[ExecCommandMode]) -> ExecCommandMode:
    """The exec mode that keeps what every one of `modes` needs."""
    return max(modes, key=EXEC_COMMAND_MODES.index)


def hash_value(key: bytes, value: str) -> str:
    """The documented hash of one value: `hmac-sha256:` + 32 hex digits."""
    # surrogatepass: a value is never refused (the normalizer lets no lone surrogate through,
    # but a hash must not be where that is found out).
    digest = hmac.digest(key, value.encode("utf-8", "surrogatepass"), "sha256")
    return HASH_PREFIX + digest.hex()[:HASH_HEX_DIGITS]


def _pattern(globs: list[str]) -> re.Pattern[str] | None:
    if not globs:
        return None
    return re.compile("|".join(translate(g) for g in globs))


class _MapRule:
    """Drop and hash patterns over the names of one map (labels or attributes)."""

    __slots__ = ("_cache", "_drop", "_hash")

    def __init__(self, drop: list[str], hash_: list[str]) -> None:
        self._drop = _pattern(drop)
        self._hash = _pattern(hash_)
        self._cache: dict[str, int] = {}

    def decide(self, name: str) -> int:
        decision = self._cache.get(name)
        if decision is None:
            if self._drop is not None and self._drop.match(name):
                decision = _DROP
            elif self._hash is not None and self._hash.match(name):
                decision = _HASH
            else:
                decision = _KEEP
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[name] = decision
        return decision

    def apply(self, values: dict[str, str], key: bytes | None) -> dict[str, str] | None:
        """The redacted map, or None when the rule leaves `values` as they are."""
        decide = self.decide
        for name in values:
            if decide(name) != _KEEP:
                break
        else:
            return None
        out: dict[str, str] = {}
        for name, value in values.items():
            decision = decide(name)
            if decision == _KEEP:
                out[name] = value
            elif decision == _HASH:
                assert key is not None  # RedactSettings asks for a key with hash
                out[name] = hash_value(key, value)
        return out


class Redaction:
    """One sink's compiled rule (`RedactSettings.compile`)."""

    __slots__ = ("_attributes", "_exec_command", "_key", "_labels")

    def __init__(
        self,
        drop: Sequence[str] = (),
        hash: Sequence[str] = (),
        *,
        key: bytes | None = None,
        exec_command: ExecCommandMode | None = None,
    ) -> None:
        """`drop` and `hash`: selectors (`labels.<glob>`, `attributes.<glob>`), already
        checked; `exec_command`: the mode to narrow exec commands to, None to leave them."""
        if hash and key is None:
            raise ValueError("hash needs a key")
        rules: dict[str, _MapRule | None] = {}
        for map_ in MAPS:
            mine_drop = [s.split(".", 1)[1] for s in drop if s.startswith(map_ + ".")]
            mine_hash = [s.split(".", 1)[1] for s in hash if s.startswith(map_ + ".")]
            rules[map_] = _MapRule(mine_drop, mine_hash) if mine_drop or mine_hash else None
        self._labels = rules["labels"]
        self._attributes = rules["attributes"]
        self._key = key
        self._exec_command = exec_command

    def event(self, event: Event) -> Event:
        """`event` itself when the rule changes nothing in it; otherwise a redacted copy, with
        its own encodings, and the same sequence number."""
        data = event.ce.data
        actor = data.actor
        labels = None if self._labels is None else self._labels.apply(actor.labels, self._key)
        attributes = (
            None
            if self._attributes is None
            else self._attributes.apply(actor.attributes, self._key)
        )
        detail = data.action_detail
        exec_mode = self._exec_command
        if exec_mode is not None and detail is not None and data.action in EXEC_ACTIONS:
            narrowed = exec_detail(detail, exec_mode)
            exec_changed = narrowed != detail
            detail = narrowed
        else:
            exec_changed = False
        if labels is None and attributes is None and not exec_changed:
            return event
        if labels is not None or attributes is not None:
            actor = msgspec.structs.replace(
                actor,
                labels=actor.labels if labels is None else labels,
                attributes=actor.attributes if attributes is None else attributes,
            )
        if labels is not None and data.context is not None:
            # The context repeats Compose and Kubernetes labels: derived again from what the
            # rule kept, a dropped label is gone from it too, a hashed one hashed there too.
            data = msgspec.structs.replace(data, context=context_of(labels))
        data = msgspec.structs.replace(data, actor=actor, action_detail=detail)
        return Event(msgspec.structs.replace(event.ce, data=data), event.seq)

    def batch(self, batch: Sequence[Event]) -> list[Event]:
        redact = self.event
        return [redact(event) for event in batch]
