"""The live recent-alerts view: a small page on the HTTP port (beside /metrics) fed by the alert streams.

``GET /alerts/`` serves a static page (``service/web/``); its script asks ``GET /alerts/api/recent`` every
second with the API key the user typed, as ``Authorization: Bearer <key>``. The key decides the tenant
exactly as on gRPC: a tenant key reads its own stream, an admin key may name any tenant. The page holds
no data itself and the key never leaves the browser tab's memory.

The HTTP server runs on threads, while the store's connections belong to the gRPC server's event loop:
each API call runs its store coroutine on that loop and waits for it, bounded.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Coroutine, Iterable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from redis.exceptions import RedisError

from service.store.base import Principal, Store, StoredAlert
from steering.registry import ID_PATTERN

PREFIX = "/alerts"
MAX_COUNT = 500  # one poll's worth; the page keeps the newest 200 rows
DEFAULT_COUNT = 50
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
# The page loads only its own script and style and talks only to this server; nothing inline, so an
# excerpt that smuggles markup could not run even if it were ever inserted as HTML.
_PAGE_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]
_ASSETS = {"": ("alerts.html", "text/html; charset=utf-8"), "app.js": ("alerts.js", "text/javascript; charset=utf-8"),
           "app.css": ("alerts.css", "text/css; charset=utf-8")}

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class HttpError(Exception):
    def __init__(self, status: str, message: str, field: str = "", headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status, self.field, self.headers = status, field, list(headers)


class AlertView:
    """WSGI app for everything under /alerts."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop, timeout_s: float = 5.0) -> None:
        self.store, self.loop, self.timeout_s = store, loop, timeout_s

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == PREFIX:  # the page's relative URLs need the trailing slash
            start_response("308 Permanent Redirect", [("Location", PREFIX + "/"), ("Content-Length", "0")])
            return []
        try:
            if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
                raise HttpError("405 Method Not Allowed", "only GET", headers=[("Allow", "GET, HEAD")])
            rest = path[len(PREFIX) + 1:]
            if rest == "api/recent":
                return _send(start_response, "200 OK", "application/json", self._recent(environ))
            if rest in _ASSETS:
                name, ctype = _ASSETS[rest]
                return _send(start_response, "200 OK", ctype, resources.files("service.web").joinpath(name).read_bytes())
            raise HttpError("404 Not Found", f"no such page: {path}")
        except HttpError as exc:
            body = json.dumps({"error": str(exc), "field": exc.field}).encode()
            return _send(start_response, exc.status, "application/json", body, exc.headers)

    def _recent(self, environ: dict[str, Any]) -> bytes:
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}
        principal = self._call(self.store.authenticate(_bearer(environ)))
        if principal is None:
            raise HttpError("401 Unauthorized", "unknown or revoked API key", headers=[("WWW-Authenticate", "Bearer")])
        tenant = _tenant(principal, query.get("tenant", ""))
        count = _count(query.get("count", ""))
        after = query.get("after", "")
        if after and after != "0" and not _STREAM_ID.match(after):
            raise HttpError("400 Bad Request", f"after: {after[:40]!r} is not an alert id (<ms>-<seq>) or '0'", "after")
        alerts = self._call(self.store.read_alerts(tenant, after, count) if after else
                            self.store.latest_alerts(tenant, count))
        last = alerts[-1].alert_id if alerts else (after or "0")
        return json.dumps({"tenant": tenant, "alerts": [_json(a) for a in alerts], "last_id": last}).encode()

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a store coroutine on the server's loop; a store that is down answers 503, not a hang."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            future.cancel()
            raise HttpError("503 Service Unavailable", "the alert store did not answer in time") from None
        except (RedisError, OSError) as exc:
            raise HttpError("503 Service Unavailable", f"the alert store is unavailable ({type(exc).__name__})") from None


def _send(start_response: StartResponse, status: str, ctype: str, body: bytes,
          extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))), *_PAGE_HEADERS, *extra])
    return [body]


def _bearer(environ: dict[str, Any]) -> str:
    auth = environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HttpError("401 Unauthorized", "missing API key: send it as 'Authorization: Bearer <key>'",
                        headers=[("WWW-Authenticate", "Bearer")])
    return key.strip()


def _tenant(principal: Principal, requested: str) -> str:
    """Same rule as gRPC's tenant_for: a tenant key may only read its own stream."""
    if not requested or requested == principal.tenant:
        return principal.tenant
    if principal.role != "admin":
        raise HttpError("403 Forbidden", f"tenant: only admin keys may read another tenant's alerts; this key "
                                         f"belongs to tenant {principal.tenant!r}", "tenant")
    if not ID_PATTERN.match(requested):
        raise HttpError("400 Bad Request", "tenant: must match " + ID_PATTERN.pattern, "tenant")
    return requested


def _count(raw: str) -> int:
    if not raw:
        return DEFAULT_COUNT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_COUNT:
        raise HttpError("400 Bad Request", f"count: must be an integer in [1, {MAX_COUNT}], got {raw[:20]!r}", "count")
    return int(raw)


def _number(text: str) -> float | None:
    """A stored float as JSON: non-finite values have no JSON form, so they become null."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _json(alert: StoredAlert) -> dict[str, Any]:
    f = alert.fields
    return {"id": alert.alert_id, "monitor": f.get("monitor", ""), "action": f.get("action", ""),
            "peak_score": _number(f.get("peak_score", "")), "threshold": _number(f.get("threshold", "")),
            "value": _number(f.get("value", "")), "token_start": int(f.get("token_start", "0") or 0),
            "token_end": int(f.get("token_end", "0") or 0), "excerpt": f.get("excerpt", ""),
            "timestamp_ms": int(f.get("timestamp_ms", "0") or 0), "request_id": f.get("request_id", ""),
            "policy": f.get("policy", ""), "phase": f.get("phase", ""), "aggregation": f.get("aggregation", "")}
