"""Helpers both stores share, so they mint keys, hash secrets and order alert ids identically."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import get_args

from service.store.base import Role
from steering.errors import invalid

SECRET_PREFIX = "sw_"
ROLES: tuple[str, ...] = get_args(Role)

StreamId = tuple[int, int]
# Both parts are unsigned 64-bit in Redis; ASCII digits only (str.isdigit would accept '²').
_STREAM_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")


def now_ms() -> int:
    """Wall-clock milliseconds (the unit Redis stream ids use)."""
    return time.time_ns() // 1_000_000


def new_secret() -> str:
    """A fresh API key: 32 random bytes, urlsafe, with a recognisable prefix."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    """A public key id. Random rather than derived from the secret, so listing ids leaks nothing."""
    return "k_" + secrets.token_hex(8)


def hash_secret(secret: str) -> str:
    """sha256 hex of the secret: the only form in which a key is ever stored."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()  # any str hashes


def check_key_args(secret: str, role: str) -> None:
    """Reject an empty secret or an unknown role before anything is stored."""
    if not secret:
        raise invalid("secret", "must not be empty")
    if role not in ROLES:
        raise invalid("role", f"must be one of {', '.join(ROLES)}, got {role!r}")


def check_fields(fields: dict[str, str]) -> None:
    """Redis streams need at least one field; the memory store enforces the same rule."""
    if not fields:
        raise invalid("fields", "an alert needs at least one field")


def parse_stream_id(value: str, field: str = "after_id") -> StreamId:
    """Parse "<ms>-<seq>" or "<ms>" (seq 0), as Redis does; raise InvalidArgument otherwise."""
    match = _STREAM_ID.fullmatch(value)
    if match is None or max(int(match[1]), int(match[2] or 0)) >= 2**64:
        raise invalid(field, f"must be a stream id like '1700000000000-0' or '0', got {value!r}")
    return int(match[1]), int(match[2] or 0)


def format_stream_id(sid: StreamId) -> str:
    """The "<ms>-<seq>" text form."""
    return f"{sid[0]}-{sid[1]}"


def next_stream_id(last: StreamId, ms: int) -> StreamId:
    """The id Redis would give the next entry: the clock, or last+1 when the clock has not advanced."""
    if ms > last[0]:
        return ms, 0
    return last[0], last[1] + 1
