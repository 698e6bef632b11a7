"""The service subcommands of ``steerwatch``: serve, keys, chat, demo (parsers and handlers)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from service.health import add_arguments as add_health_arguments
from steering.errors import invalid

if TYPE_CHECKING:
    from service.store.base import Principal, Role


def add_service_parsers(sub: Any) -> None:
    """serve, keys create, chat, demo (logic: service/serve.py, service/demo.py)."""
    s = sub.add_parser("serve", help="run the gRPC server (flags override STEERWATCH_* and the YAML file)")
    s.add_argument("--config", default=None, help="YAML settings file (default: $STEERWATCH_CONFIG)")
    s.add_argument("--port", type=int, help="gRPC port (default 50051)")
    s.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9090)")
    s.add_argument("--host", help="address to bind (default 0.0.0.0)")
    s.add_argument("--model", help="'default' (embedded Gemma 3 270M) or a local HF checkpoint dir")
    s.add_argument("--redis-url", help="shared Redis store (default: in-memory, this process only)")
    s.add_argument("--quantize", choices=["4bit", "8bit"])
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--device", help="cpu, cuda, cuda:N or mps")
    s.add_argument("--engine", choices=["auto", "hf", "vllm"], help="auto (default): vllm when installed")

    k = sub.add_parser("keys", help="API keys in the Redis store")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="mint an API key (the secret is printed once)")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--role", choices=["tenant", "admin"], default="tenant")
    kc.add_argument("--redis-url", default=os.environ.get("STEERWATCH_REDIS_URL"),
                    help="the servers' Redis (default: $STEERWATCH_REDIS_URL)")
    kc.add_argument("--prefix", default="steerwatch:", help="key prefix of the store (servers use the default)")

    c = sub.add_parser("chat", help="chat with a running server (one PROMPT, or lines from stdin)")
    c.add_argument("prompt", nargs="?", default=None)
    c.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    c.add_argument("--api-key", default=os.environ.get("STEERWATCH_API_KEY"),
                   help="API key (default: $STEERWATCH_API_KEY)")
    c.add_argument("--tls-root-cert", default=None, help="PEM file of the server's CA: connect with TLS")
    c.add_argument("--tls-client-cert", default=None, help="PEM client certificate (servers requiring mutual TLS)")
    c.add_argument("--tls-client-key", default=None, help="PEM private key of --tls-client-cert")
    c.add_argument("--policy", default="", help="policy name (default: the tenant's default policy)")
    c.add_argument("--max-tokens", type=int, default=0, help="0 = the policy's default")
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--readings", action="store_true", help="ask for per-token readings (colours the text)")

    h = sub.add_parser("health", help="exit 0 when a server's gRPC health service says SERVING (container probes)")
    add_health_arguments(h)

    d = sub.add_parser("demo", help="in-process server: vector, policy, monitors, steering and alerts end to end")
    d.add_argument("--model", default="default", help="'default' or a local HF checkpoint dir")


def _serve(args: argparse.Namespace) -> int:
    from service.serve import serve_forever
    from service.settings import ConfigError, Settings

    names = ("port", "metrics_port", "host", "model", "redis_url", "quantize", "dtype", "device", "engine")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        settings = Settings.load(args.config, **overrides)
    except ConfigError as exc:
        Console(stderr=True, highlight=False).print(Text.assemble(("error", "bold red"), f": {exc}"))
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve_forever(settings))
    return 0


def _keys(args: argparse.Namespace) -> int:
    from steering.registry import check_id

    if not args.redis_url:
        raise invalid("--redis-url", "required. Keys can only be minted in the shared Redis store; the "
                      "in-memory store lives inside the server process: use the admin key the server "
                      "prints at start (or STEERWATCH_BOOTSTRAP_ADMIN_KEY), or run it with --redis-url")
    check_id(args.tenant, "--tenant")
    secret, principal = asyncio.run(_create_key(args.redis_url, args.prefix, args.tenant, args.role))
    Console(stderr=True).print(f"created {principal.role} key {principal.key_id} for tenant {principal.tenant!r}; "
                               "the secret below is shown once:")
    print(secret)
    return 0


async def _create_key(url: str, prefix: str, tenant: str, role: Role) -> tuple[str, Principal]:
    from service.store import open_store

    store = await open_store(url, prefix=prefix)
    try:
        return await store.create_key(tenant, role)
    finally:
        await store.close()


def _chat(args: argparse.Namespace) -> int:
    from service.client import SteerwatchClient
    from service.demo import chat

    if not args.api_key:
        raise invalid("--api-key", "missing; pass --api-key or set STEERWATCH_API_KEY")
    options = {"policy": args.policy, "max_tokens": args.max_tokens, "temperature": args.temperature,
               "seed": args.seed, "include_readings": args.readings}

    async def run() -> int:
        async with SteerwatchClient(args.target, args.api_key, tls_root_cert=args.tls_root_cert,
                                    tls_client_cert=args.tls_client_cert, tls_client_key=args.tls_client_key) as client:
            return await chat(client, args.prompt, **options)

    return asyncio.run(run())


def _health(args: argparse.Namespace) -> int:
    from service.health import run

    return run(args)


def _demo(args: argparse.Namespace) -> int:
    from service.demo import demo

    return asyncio.run(demo(args.model))


SERVICE_COMMANDS = {"serve": _serve, "keys": _keys, "chat": _chat, "health": _health, "demo": _demo}
