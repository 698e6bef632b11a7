"""Mutual TLS with a CA generated for the test: the gRPC port and the HTTP port accept only clients
presenting a certificate the configured CA signed; a client without one, or with a certificate from
another CA, is refused in the handshake. The client, ``steerwatch chat`` options and the health
command present one."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from service.cli import main
from service.client import SteerwatchClient
from service.serve import start_replica
from service.settings import ConfigError, Settings
from tests.service.grpc_harness import run, tiny_lm

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    openssl("req", "-x509", *EC, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem"), "-days", "1",
            "-subj", f"/CN={name}")
    return d / f"{name}.pem", d / f"{name}.key"


def issue(d: Path, ca: tuple[Path, Path], name: str, ext: str) -> tuple[Path, Path]:
    """A certificate for ``name`` signed by ``ca``, with the X.509 extensions ``ext``."""
    openssl("req", *EC, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"), "-subj", f"/CN={name}")
    (d / f"{name}.ext").write_text(ext + "\n")
    openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
            "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "1", "-extfile", str(d / f"{name}.ext"))
    return d / f"{name}.pem", d / f"{name}.key"


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(tmp_path: Path) -> None:
    ca, rogue_ca = make_ca(tmp_path, "ca"), make_ca(tmp_path, "rogue-ca")
    server = issue(tmp_path, ca, "server", "subjectAltName=IP:127.0.0.1")
    client = issue(tmp_path, ca, "client", "extendedKeyUsage=clientAuth")
    rogue = issue(tmp_path, rogue_ca, "rogue", "extendedKeyUsage=clientAuth")
    settings = Settings.load(None, host="127.0.0.1", port=0, metrics_port=0, tls_cert_file=str(server[0]),
                             tls_key_file=str(server[1]), tls_client_ca_file=str(ca[0]), http_tls=True)

    async def body() -> None:
        r = await start_replica(settings, lm=tiny_lm())
        assert r.admin_key is not None
        target = f"127.0.0.1:{r.port}"
        try:
            async with SteerwatchClient(target, r.admin_key, tls_root_cert=ca[0], tls_client_cert=client[0],
                                        tls_client_key=client[1], timeout=10) as sw:
                assert (await sw.info()).n_layers == 3
            for cert in (None, rogue):
                identity = {} if cert is None else {"tls_client_cert": cert[0], "tls_client_key": cert[1]}
                async with SteerwatchClient(target, r.admin_key, tls_root_cert=ca[0], timeout=10, **identity) as sw:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await sw.info()
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed
            health = ["health", "--target", target, "--tls-root-cert", str(ca[0]), "--timeout", "5"]
            assert await asyncio.to_thread(main, health) == 1
            assert await asyncio.to_thread(main, [*health, "--tls-client-cert", str(client[0]),
                                                  "--tls-client-key", str(client[1])]) == 0
            # the HTTP port asks for the same
            url = f"https://127.0.0.1:{r.metrics_port}/metrics"
            good = ssl.create_default_context(cafile=str(ca[0]))
            good.load_cert_chain(str(client[0]), str(client[1]))
            with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5, context=good) as resp:
                assert resp.status == 200
            with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
                await asyncio.to_thread(urllib.request.urlopen, url, timeout=5,
                                        context=ssl.create_default_context(cafile=str(ca[0])))
        finally:
            await r.stop(0)

    run(body(), timeout=60)


def test_a_client_ca_without_a_server_certificate_is_a_configuration_error(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "ca")
    with pytest.raises(ConfigError, match="tls_client_ca_file"):
        Settings.load(None, tls_client_ca_file=str(ca[0]))
