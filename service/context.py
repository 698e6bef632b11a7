"""Per-RPC context: who is calling and which request this is.

The interceptors set these contextvars inside the RPC's own task (grpc.aio runs each RPC in a task of
its own, with a copy of the context), so servicers read them with the getters below and nothing leaks
between RPCs.
"""

from __future__ import annotations

from contextvars import ContextVar

from service.store.base import Principal
from steering.errors import SteerwatchError
from steering.registry import check_id


class Unauthenticated(SteerwatchError):
    """No API key, or an unknown or revoked one."""

    grpc_status = "UNAUTHENTICATED"


class PermissionDenied(SteerwatchError):
    """The key is valid but may not do this (a tenant key acting for another tenant)."""

    grpc_status = "PERMISSION_DENIED"


principal: ContextVar[Principal | None] = ContextVar("steerwatch_principal", default=None)
request_id: ContextVar[str] = ContextVar("steerwatch_request_id", default="")


def current_principal() -> Principal:
    """The authenticated caller; Unauthenticated outside an authenticated RPC."""
    p = principal.get()
    if p is None:
        raise Unauthenticated("this call needs an API key: send it as x-api-key metadata")
    return p


def current_request_id() -> str:
    """The request id of this RPC ("" outside an RPC)."""
    return request_id.get()


def tenant_for(requested: str) -> str:
    """The tenant a call acts for: the caller's own, or for admins the ``requested`` one when given.

    A tenant key naming another tenant is refused rather than silently narrowed to its own tenant, so
    a client bug cannot read or write the wrong tenant's data unnoticed.
    """
    p = current_principal()
    if not requested or requested == p.tenant:
        return p.tenant
    if p.role == "admin":
        return check_id(requested, "tenant")
    raise PermissionDenied(f"tenant: only admin keys may act for another tenant; this key belongs to "
                           f"tenant {p.tenant!r}", field="tenant")
