"""How an event field becomes part of a destination's name or metadata.

Anyone who can run `docker network create` chooses text that reaches topics, keys, headers and
user properties. This module is the one place that decides how such text is made safe for each
binding; the sinks call it for every event field they put outside the JSON payload (the payload
itself is JSON, which escapes everything).

The one escape: percent-encoding. A character is written as `%XX` for each byte of its UTF-8
encoding (a lone surrogate, which has no UTF-8 form, as the bytes Python's `surrogatepass`
gives it). It applies to the characters no binding may carry as text, the ones MQTT 5 brokers
refuse as "malformed UTF-8" (Mosquitto drops the connection):

- control characters: C0 (U+0000-U+001F), DEL (U+007F), C1 (U+0080-U+009F);
- surrogates (U+D800-U+DFFF: not encodable as UTF-8);
- noncharacters (U+FDD0-U+FDEF, and U+xFFFE, U+xFFFF in every plane).

Per binding:

- `escape_text(value)`: an MQTT 5 user property, a Kafka header or key (UTF-8 strings). The
  characters above and `%` itself are escaped, so `unescape` (`urllib.parse.unquote` with
  `errors="surrogatepass"`) gives back the exact original. Other text is unchanged.
- `encode_header_value(value)`: an HTTP header (CloudEvents HTTP binding 3.1.3.2): everything
  outside printable ASCII, space, `"` and `%` escaped; reversible by the same `unescape`.
- `mqtt_topic_level(value)`: one MQTT topic level. The characters above escaped; `/`, `+`,
  `#` become `_`; a leading `$` becomes `%24` (topics starting with `$` belong to the broker);
  an empty value becomes `-`; a level longer than `MQTT_LEVEL_MAX_BYTES` is cut and ends in
  `~` plus 12 hex digits of a hash of the value, so long values stay distinct. Not reversible:
  a topic is for routing, the payload carries the exact value.
- `kafka_topic_part(value)`: part of a Kafka topic: every character outside `a-zA-Z0-9._-`
  becomes `_` (Kafka's character set leaves nothing free for an escape character).
  `kafka_topic(topic)` then bounds the whole topic: longer than 249 characters, it is cut and
  ends in `-` plus 12 hex digits of a hash of the whole, so long topics stay distinct; `.` and
  `..` (which Kafka refuses) become `_` and `__`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final
from urllib.parse import quote, unquote

__all__ = [
    "KAFKA_TOPIC_MAX",
    "MQTT_LEVEL_MAX_BYTES",
    "MQTT_TOPIC_MAX_BYTES",
    "encode_header_value",
    "escape_text",
    "has_unsafe_chars",
    "kafka_topic",
    "kafka_topic_part",
    "mqtt_topic_level",
    "unescape",
]

MQTT_TOPIC_MAX_BYTES: Final = 65_535
"""MQTT's limit on a topic name (a UTF-8 string with a 2-byte length)."""
MQTT_LEVEL_MAX_BYTES: Final = 1024
"""The longest topic level one placeholder fills; with the template's fixed text this bounds the
whole topic, which the MQTT sink checks once at configuration time."""
KAFKA_TOPIC_MAX: Final = 249

_HASH_HEX: Final = 12


def _unsafe_code_points() -> list[int]:
    points = [*range(0x00, 0x20), *range(0x7F, 0xA0), *range(0xD800, 0xE000)]
    points += range(0xFDD0, 0xFDF0)
    for plane in range(17):
        points += (plane << 16 | 0xFFFE, plane << 16 | 0xFFFF)
    return points


def _percent(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))


_UNSAFE: Final = tuple(chr(c) for c in _unsafe_code_points())
_ESCAPES: Final[dict[int, str]] = {ord(ch): _percent(ch) for ch in _UNSAFE}
_TEXT_TABLE: Final = {**_ESCAPES, ord("%"): "%25"}
_LEVEL_TABLE: Final = {**_ESCAPES, ord("/"): "_", ord("+"): "_", ord("#"): "_"}
_UNSAFE_RE: Final = re.compile("[" + "".join(re.escape(ch) for ch in _UNSAFE) + "]")


def has_unsafe_chars(value: str) -> bool:
    """Whether `value` holds a character no binding carries as text (see the module doc)."""
    if value.isascii():
        # In ASCII, the unprintable characters are exactly C0 and DEL.
        return not value.isprintable()
    return _UNSAFE_RE.search(value) is not None


def _plain(value: str) -> bool:
    # Printable ASCII (space included) has nothing to escape in any binding but `%`.
    return value.isascii() and value.isprintable()


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]


def escape_text(value: str) -> str:
    """A UTF-8 string property (MQTT 5 user property, Kafka header or key)."""
    if _plain(value) and "%" not in value:
        return value
    return value.translate(_TEXT_TABLE)


# CloudEvents HTTP binding: printable ASCII but space, '"' and '%' travels as it is.
_HEADER_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


def encode_header_value(value: str) -> str:
    """An HTTP header value (CloudEvents HTTP binding 3.1.3.2 percent-encoding)."""
    if _plain(value) and " " not in value and '"' not in value and "%" not in value:
        return value
    return quote(value, safe=_HEADER_SAFE, errors="surrogatepass")


def unescape(value: str) -> str:
    """The original of `escape_text()` or `encode_header_value()`."""
    return unquote(value, errors="surrogatepass")


def mqtt_topic_level(value: str) -> str:
    """One MQTT topic level: one placeholder never adds a level, a wildcard or a `$` topic."""
    if not value:
        return "-"
    if _plain(value):
        level = value.replace("/", "_").replace("+", "_").replace("#", "_")
    else:
        level = value.translate(_LEVEL_TABLE)
    if level[0] == "$":
        level = "%24" + level[1:]
    # A character is at most 4 bytes: most levels are decided without encoding them.
    if len(level) * 4 > MQTT_LEVEL_MAX_BYTES:
        data = level.encode()
        if len(data) > MQTT_LEVEL_MAX_BYTES:
            level = _cut(data, MQTT_LEVEL_MAX_BYTES - 1 - _HASH_HEX) + "~" + _digest(value)
    return level


def _cut(data: bytes, size: int) -> str:
    """The first `size` bytes of UTF-8 `data`, shortened to whole characters and escapes."""
    head = data[:size].decode("utf-8", "ignore")
    percent = head.rfind("%", -2)
    return head[:percent] if percent != -1 else head


_KAFKA_ILLEGAL: Final = re.compile(r"[^a-zA-Z0-9._-]")
# bytes.translate over a 256-byte table: several times faster than a regex or str.translate.
_KAFKA_ASCII: Final = bytes(
    c if _KAFKA_ILLEGAL.match(chr(c)) is None else ord("_") for c in range(256)
)


def kafka_topic_part(value: str) -> str:
    """An event field inside a Kafka topic: only Kafka's characters."""
    if value.isascii():
        return value.encode("ascii").translate(_KAFKA_ASCII).decode("ascii")
    return _KAFKA_ILLEGAL.sub("_", value)


def kafka_topic(topic: str) -> str:
    """A whole rendered Kafka topic (fixed text and `kafka_topic_part` values) made valid."""
    if len(topic) > KAFKA_TOPIC_MAX:
        return topic[: KAFKA_TOPIC_MAX - 1 - _HASH_HEX] + "-" + _digest(topic)
    if topic == "." or topic == "..":
        return "_" * len(topic)
    return topic
