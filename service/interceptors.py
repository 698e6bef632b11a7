"""gRPC server interceptors, one job each: metrics, request ids, error mapping, authentication.

Each interceptor wraps the RPC's behavior function instead of acting in ``intercept_service``, so its
work runs inside the RPC's own task: contextvars it sets are visible to the servicer, and exceptions
and cancellation raised by the servicer pass through it.

Order (outermost first), as ``build_server`` installs them:

1. MetricsInterceptor: sees every outcome, including aborts made by the three below, so the code it
   counts is the one the client gets.
2. RequestIdInterceptor: the id is known before anything can fail, so error logs and messages carry it.
3. ErrorInterceptor: turns exceptions from auth and the servicer into status codes.
4. AuthInterceptor: innermost, so a failing store lookup is still mapped (INTERNAL with the request id)
   and counted.

All wrapped behaviors are coroutine functions; a server-streaming one writes with ``context.write``.
That keeps a stream inside one coroutine, where cancellation (client gone, deadline, shutdown) reaches
every wrapper, rather than in a suspended async generator that grpc would leave unclosed.

For servicers: write them async (a sync behavior would run on the event loop here, not in a thread);
async generators and ``context.write`` both work. ``x-request-id`` goes out as initial metadata before
the behavior runs, so servicers add their own metadata as trailing metadata.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from pydantic import ValidationError
from redis.exceptions import RedisError

from service import context as ctx
from service.metrics import Metrics
from service.outage import KeyMemory
from service.settings import explain
from steering.errors import SteerwatchError, invalid

log = logging.getLogger(__name__)

Call = Callable[[], Awaitable[Any]]
EXEMPT_FROM_AUTH = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_HANDLER_FACTORIES = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


@dataclass(frozen=True)
class Undecodable:
    """Stands in for request bytes that do not parse, so the error reaches the interceptors (auth, error
    mapping, metrics) as INVALID_ARGUMENT instead of grpc's own UNKNOWN before any of them runs."""

    message: str
    reason: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The deserializer, returning an Undecodable instead of raising (wrapped once across the layers)."""
    if deserializer is None or getattr(deserializer, "_steerwatch_tolerant", False):
        return deserializer
    name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    message = name.name if name is not None else "request"

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return Undecodable(message, str(exc) or "malformed bytes")

    parse._steerwatch_tolerant = True  # type: ignore[attr-defined]
    return parse


async def _invoke(behavior: Callable[..., Any], request: Any, context: Any, streaming: bool) -> Any:
    """Run the original behavior to completion; a response stream is written with context.write."""
    if isinstance(request, Undecodable) and not getattr(behavior, "_steerwatch_wrapper", False):
        # the servicer's own method is next: refuse here, inside every interceptor's ``around``
        raise invalid("request", f"is not a valid {request.message} message ({request.reason})")
    result = behavior(request, context)
    if not streaming:
        return await result if inspect.isawaitable(result) else result
    if inspect.isawaitable(result):  # reader/writer API: the behavior writes itself
        return await result
    if hasattr(result, "__aiter__"):
        async with aclosing(result) as responses:  # close it here, in this task, whatever happens
            async for response in responses:
                await context.write(response)
    else:
        for response in result:
            await context.write(response)
    return None


def wrap_handler(handler: grpc.RpcMethodHandler, around: Callable[[Any, Call], Awaitable[Any]],
                 ) -> grpc.RpcMethodHandler:
    """A handler whose behavior runs inside ``around(context, call)``; serializers are kept."""
    streaming = bool(handler.response_streaming)
    kind, factory = _HANDLER_FACTORIES[(bool(handler.request_streaming), streaming)]
    behavior = getattr(handler, kind)

    async def wrapped(request: Any, context: Any) -> Any:
        return await around(context, lambda: _invoke(behavior, request, context, streaming))

    wrapped._steerwatch_wrapper = True  # type: ignore[attr-defined]
    return factory(wrapped, request_deserializer=_tolerant(handler.request_deserializer),
                   response_serializer=handler.response_serializer)


class _Wrapping(grpc.aio.ServerInterceptor):
    """Base: wrap the behavior of every method ``applies`` accepts in ``around``."""

    def applies(self, method: str) -> bool:
        return True

    async def around(self, method: str, context: Any, call: Call) -> Any:
        raise NotImplementedError

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.applies(method):  # unknown method: grpc answers UNIMPLEMENTED
            return handler

        async def around(context: Any, call: Call) -> Any:
            return await self.around(method, context, call)

        return wrap_handler(handler, around)


def _metadata(context: Any, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key and isinstance(v, str):
            return v
    return None


def status_code(name: str) -> grpc.StatusCode:
    """The grpc.StatusCode named ``name``; INTERNAL for unknown names and for OK (an error is never OK)."""
    code = grpc.StatusCode.__members__.get(name)
    return code if code is not None and code is not grpc.StatusCode.OK else grpc.StatusCode.INTERNAL


def _code_name(code: Any) -> str | None:
    """grpc.aio's context.code() gives a grpc.StatusCode, a raw int, or None when unset."""
    if isinstance(code, grpc.StatusCode):
        return code.name
    return _CODE_NAMES.get(code) if isinstance(code, int) else None


class MetricsInterceptor(_Wrapping):
    """Counts RPCs by method and final status code and observes their duration."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def around(self, method: str, context: Any, call: Call) -> Any:
        start = time.perf_counter()
        code = "UNKNOWN"
        try:
            result = await call()
            code = _code_name(context.code()) or "OK"
            return result
        except grpc.aio.AbortError:
            code = _code_name(context.code()) or "UNKNOWN"
            raise
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except BaseException:
            set_code = _code_name(context.code())  # grpc sends UNKNOWN unless the servicer set a code
            code = set_code if set_code not in (None, "OK") else "UNKNOWN"
            raise
        finally:
            self.metrics.observe_request(method, code, time.perf_counter() - start)


class RequestIdInterceptor(_Wrapping):
    """Adopts a valid ``x-request-id`` from the client or makes one, and echoes it as initial metadata."""

    async def around(self, method: str, context: Any, call: Call) -> Any:
        given = _metadata(context, REQUEST_ID_HEADER)
        rid = given if given is not None and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        # Not reset afterwards: the RPC's task owns a copy of the context that dies with it.
        ctx.request_id.set(rid)
        await context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
        return await call()


class ErrorInterceptor(_Wrapping):
    """Maps exceptions to status codes; never sends an unexpected exception's text to the client."""

    async def around(self, method: str, context: Any, call: Call) -> Any:
        try:
            return await call()
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise  # an abort already carries its status; grpc asserts it is re-raised unchanged
        except SteerwatchError as e:
            await context.abort(status_code(e.grpc_status), str(e))
        except ValidationError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {explain(e)}")
        except RedisError as e:  # the shared store is down or failing: retryable, not a server bug
            log.warning("store error in %s (request id %s): %s", method, ctx.current_request_id(), type(e).__name__)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the store is unavailable ({type(e).__name__}); retry later")
        except Exception:
            rid = ctx.current_request_id()
            log.exception("unexpected error in %s (request id %s)", method, rid)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")


class AuthInterceptor(_Wrapping):
    """Resolves the API key (``x-api-key`` or ``authorization: Bearer``) to a principal via the store."""

    def __init__(self, keys: KeyMemory) -> None:
        self.keys = keys

    def applies(self, method: str) -> bool:
        return not method.startswith(EXEMPT_FROM_AUTH)  # probes and tooling work without a key

    async def around(self, method: str, context: Any, call: Call) -> Any:
        key = api_key(context)
        if not key:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing API key: send it as x-api-key metadata")
        principal = await self.keys.authenticate(key or "")
        if principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked API key")
        ctx.principal.set(principal)
        return await call()


def api_key(context: Any) -> str | None:
    """The key from ``x-api-key``, else from ``authorization: Bearer <key>``."""
    key = _metadata(context, "x-api-key")
    if key:
        return key.strip()
    auth = _metadata(context, "authorization") or ""
    scheme, _, token = auth.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None
