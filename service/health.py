"""``steerwatch health`` / ``python -m service.health``: one gRPC health Check, for container probes.

Kept apart from the rest of the command line on purpose: it imports only grpc (0.2 s), where the full
``steerwatch`` CLI pulls in torch (2.5 s of CPU), which a Docker HEALTHCHECK would pay every interval.
Exit status: 0 when the answer is SERVING, 1 for anything else, including no answer in time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from steering.errors import SteerwatchError, invalid


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    p.add_argument("--service", default="", help="health service name ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    p.add_argument("--tls-root-cert", default=None, help="PEM file of the server's CA: connect with TLS")
    p.add_argument("--tls-client-cert", default=None, help="PEM client certificate (servers requiring mutual TLS)")
    p.add_argument("--tls-client-key", default=None, help="PEM private key of --tls-client-cert")
    p.add_argument("--tls-server-name", default=None,
                   help="name to check the server certificate against when it differs from the target's host")


def client_identity(cert: str | os.PathLike[str] | None, key: str | os.PathLike[str] | None) -> dict[str, bytes]:
    """grpc.ssl_channel_credentials' arguments for a client certificate (both files or neither); here,
    not in service.client, so the health check shares it without that module's imports."""
    if (cert is None) != (key is None):
        raise invalid("tls_client_cert", "and tls_client_key go together: give both or neither")
    if cert is None or key is None:
        return {}
    return {"certificate_chain": Path(cert).read_bytes(), "private_key": Path(key).read_bytes()}


async def check(args: Any) -> str:
    """The serving status name ("SERVING", "NOT_SERVING", ...) or "UNREACHABLE (...)"."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    identity = client_identity(args.tls_client_cert, args.tls_client_key)
    if args.tls_root_cert or identity:  # a client certificate alone: TLS with the system's roots
        roots = Path(args.tls_root_cert).read_bytes() if args.tls_root_cert else None
        creds = grpc.ssl_channel_credentials(root_certificates=roots, **identity)
        channel = grpc.aio.secure_channel(args.target, creds, options=options)
    else:
        channel = grpc.aio.insecure_channel(args.target)
    try:
        async with channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        return f"UNREACHABLE ({exc.code().name}: {exc.details()})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def run(args: Any) -> int:
    try:
        status = asyncio.run(check(args))
    except SteerwatchError as exc:  # a usage error (a client certificate without its key)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(status)
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.health", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
