"""Everything the servicers share: settings, engine, store, metrics, caches, loaded SAEs and probes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from service.outage import AlertOutbox, OutageMode
from service.policy import EMPTY_POLICY, Policy
from service.quotas import TenantStreams
from service.state import PolicyCache, TenantVectors
from service.store.base import Store


@dataclass
class App:
    """One replica's wiring. ``engine`` is an HFEngine or a VLLMEngine (the same surface)."""

    engine: Any
    store: Store
    metrics: Any
    model_name: str
    engine_kind: str = "hf"
    sae_ids: list[str] = field(default_factory=list)
    probe_ids: list[str] = field(default_factory=list)
    shared_vectors: list[str] = field(default_factory=list)  # the monitor pack's, every tenant may use
    draining: asyncio.Event = field(default_factory=asyncio.Event)  # set when the server starts draining
    fallback_policy: Policy = EMPTY_POLICY  # applies to tenants without a default policy
    request_timeout_s: float | None = None  # server-side cap on one generation
    store_outage: OutageMode = "serve_cached"  # see service/outage.py
    alert_buffer: int = 10_000  # alerts held while the store is down
    max_streams_per_tenant: int = 64  # Generate + WatchAlerts streams per tenant on this replica
    max_watch_s: float = 3600.0  # a WatchAlerts stream ends after this (the client resumes with after_id)
    policies: PolicyCache = field(init=False)
    vectors: TenantVectors = field(init=False)
    alerts: AlertOutbox = field(init=False)  # writes alerts to the store, queueing them through an outage
    streams: TenantStreams = field(init=False)

    def __post_init__(self) -> None:
        self.policies = PolicyCache(self.store, self.fallback_policy)
        self.vectors = TenantVectors(self.store, self.engine.registry)
        self.alerts = AlertOutbox(self.store, self.store_outage, self.metrics, self.alert_buffer)
        self.streams = TenantStreams(self.max_streams_per_tenant)

    @cached_property
    def label_sources(self) -> frozenset[str]:
        """Asset ids the operator loaded (server SAEs and probes, the monitor pack): the only monitor
        sources that may become metric label values; everything tenants name stays out of labels."""
        return frozenset(self.sae_ids) | frozenset(self.probe_ids) | frozenset(self.shared_vectors)

    @property
    def registry(self) -> Any:
        return self.engine.registry
