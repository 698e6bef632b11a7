"""Per-tenant stream quotas of one replica: how many Generate and WatchAlerts streams a tenant may hold
open at once, so one tenant cannot take every slot of ``max_concurrent_rpcs`` from the others."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from steering.errors import LimitExceeded


class TenantStreams:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    @contextmanager
    def slot(self, tenant: str) -> Iterator[None]:
        """Hold one of the tenant's stream slots for the body; RESOURCE_EXHAUSTED when none is free."""
        if self._open[tenant] >= self.limit:
            raise LimitExceeded(f"limits.max_streams_per_tenant: this tenant already has {self.limit} open streams "
                                "on this replica; close one or retry later", field="limits.max_streams_per_tenant")
        self._open[tenant] += 1
        try:
            yield
        finally:
            self._open[tenant] -= 1
            if not self._open[tenant]:
                del self._open[tenant]

    def open(self, tenant: str) -> int:
        return self._open[tenant]
