"""The state contract: API keys, tenant policies, vectors and alert streams.

Two implementations keep to it: ``MemoryStore`` (the embedded default, one process) and ``RedisStore``
(shared by every replica). One contract test suite runs against both (tests/service/test_store_contract.py).
Every method is async. Tenants are isolated by construction: every call names its tenant, and no
method can reach another tenant's keys.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["admin", "tenant"]

# First item of every invalidations() stream: from here on no message can be missed, so a subscriber
# that (re)connects clears its caches on it instead of guessing when the subscription became active.
SUBSCRIBED: tuple[str, str, str] = ("", "subscribed", "")


@dataclass(frozen=True)
class Principal:
    """Who an API key belongs to."""

    tenant: str
    role: Role
    key_id: str  # public, non-secret identifier of the key (for listing and revoking)


@dataclass(frozen=True)
class PolicyRecord:
    """One stored version of a tenant policy. ``document`` is the validated policy as JSON text."""

    tenant: str
    name: str
    version: int  # 1, 2, ... per (tenant, name); every put makes a new version
    document: str
    updated_at_ms: int
    is_default: bool = False


@dataclass(frozen=True)
class VectorRecord:
    """A tenant's steering vector: metadata plus the safetensors bytes of the vector file."""

    tenant: str
    vector_id: str
    blob: bytes  # a steerwatch vector file (steering/vectors.py format)
    meta: dict[str, str] = field(default_factory=dict)  # model, layers, method, source, norm, d_model
    created_at_ms: int = 0


@dataclass(frozen=True)
class StoredAlert:
    """An alert as kept in a tenant's stream. ``alert_id`` is the stream entry id ("<ms>-<seq>")."""

    alert_id: str
    fields: dict[str, str]


class Store(ABC):
    """Async state shared by the servicers."""

    # ---- API keys (stored hashed; the secret is only ever returned by create_key) ----
    @abstractmethod
    async def create_key(self, tenant: str, role: Role) -> tuple[str, Principal]:
        """Mint a new random API key; returns (secret, principal). Only the hash is stored."""

    @abstractmethod
    async def add_key(self, secret: str, tenant: str, role: Role) -> Principal:
        """Store a caller-chosen key (bootstrap admin key from settings). Idempotent for the same key."""

    @abstractmethod
    async def authenticate(self, secret: str) -> Principal | None:
        """The principal of a key, or None when unknown or revoked."""

    @abstractmethod
    async def revoke_key(self, tenant: str, key_id: str) -> bool:
        """Remove a key by its id; False when the tenant has no such key."""

    # ---- policies (versioned JSON documents, one default per tenant) ----
    @abstractmethod
    async def put_policy(self, tenant: str, name: str, document: str, *, make_default: bool = False) -> PolicyRecord:
        """Store a new version (previous ones stay readable); optionally make ``name`` the default."""

    @abstractmethod
    async def get_policy(self, tenant: str, name: str, version: int | None = None) -> PolicyRecord | None:
        """The latest (or the given) version; None when absent."""

    @abstractmethod
    async def list_policies(self, tenant: str) -> list[PolicyRecord]:
        """Latest version of each of the tenant's policies, sorted by name."""

    @abstractmethod
    async def delete_policy(self, tenant: str, name: str) -> bool:
        """Delete every version; clears the default if it was this one. False when absent."""

    @abstractmethod
    async def default_policy(self, tenant: str) -> str | None:
        """Name of the tenant's default policy."""

    # ---- vectors ----
    @abstractmethod
    async def put_vector(self, record: VectorRecord, *, replace: bool = False) -> None:
        """Store a vector; raises steering.errors.AlreadyExists when present and not ``replace``."""

    @abstractmethod
    async def get_vector(self, tenant: str, vector_id: str) -> VectorRecord | None: ...

    @abstractmethod
    async def list_vectors(self, tenant: str) -> list[VectorRecord]:
        """The tenant's vectors sorted by id (blobs included)."""

    @abstractmethod
    async def delete_vector(self, tenant: str, vector_id: str) -> bool: ...

    # ---- alerts: one bounded stream per tenant ----
    @abstractmethod
    async def add_alert(self, tenant: str, fields: dict[str, str]) -> str:
        """Append to the tenant's stream (trimmed to the configured max length); returns the entry id."""

    @abstractmethod
    async def read_alerts(self, tenant: str, after_id: str = "0", count: int = 100) -> list[StoredAlert]:
        """Entries strictly after ``after_id`` ("0" = from the start), oldest first."""

    @abstractmethod
    async def latest_alerts(self, tenant: str, count: int = 50) -> list[StoredAlert]:
        """The newest ``count`` entries, oldest first (a view that opens on the recent past)."""

    @abstractmethod
    def watch_alerts(self, tenant: str, after_id: str = "$") -> AsyncIterator[StoredAlert]:
        """Live entries after ``after_id`` ("$" = only new ones), forever, in order, none lost."""

    # ---- cache invalidation across replicas ----
    @abstractmethod
    async def publish_invalidation(self, tenant: str, kind: str, name: str) -> None:
        """Tell every replica that (tenant, kind, name) changed; kind is 'policy' or 'vector'."""

    @abstractmethod
    def invalidations(self) -> AsyncIterator[tuple[str, str, str]]:
        """``SUBSCRIBED`` once the subscription is active, then (tenant, kind, name) messages published by
        any replica, this one included."""

    @abstractmethod
    async def ping(self) -> bool: ...

    @abstractmethod
    async def close(self) -> None: ...
