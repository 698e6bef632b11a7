"""``steerwatch health`` / ``python -m service.health``: one gRPC health Check, for container probes.

Kept apart from the rest of the command line on purpose: it imports only grpc (0.2 s), where the full
``steerwatch`` CLI pulls in torch (2.5 s of CPU), which a Docker HEALTHCHECK would pay every interval.
Exit status: 0 when the answer is SERVING, 1 for anything else, including no answer in time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    p.add_argument("--service", default="", help="health service name ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    p.add_argument("--tls-root-cert", default=None, help="PEM file of the server's CA: connect with TLS")
    p.add_argument("--tls-client-cert", default=None, help="PEM client certificate (servers requiring mutual TLS)")
    p.add_argument("--tls-client-key", default=None, help="PEM private key of --tls-client-cert")
    p.add_argument("--tls-server-name", default=None,
                   help="name to check the server certificate against when it differs from the target's host")


async def check(args: Any) -> str:
    """The serving status name ("SERVING", "NOT_SERVING", ...) or "UNREACHABLE (...)"."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    if args.tls_root_cert:
        with open(args.tls_root_cert, "rb") as f:
            roots = f.read()
        identity = {}
        if args.tls_client_cert and args.tls_client_key:
            with open(args.tls_client_cert, "rb") as c, open(args.tls_client_key, "rb") as k:
                identity = {"certificate_chain": c.read(), "private_key": k.read()}
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
    status = asyncio.run(check(args))
    print(status)
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.health", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
