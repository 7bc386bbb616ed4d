"""The Redis backend over a Unix socket (``unix://``) and TLS (``rediss://``),
against real servers."""

import subprocess
import time

from stargate.backends.redis import RedisBackend
from stargate.testing.redis_server import RedisServer, free_port
from tests import green


def test_unix_socket_url_publishes_and_delivers(tmp_path):
    path = tmp_path / "redis.sock"
    unix = ["--unixsocket", str(path), "--unixsocketperm", "700"]
    with RedisServer(extra_args=unix):
        backend = RedisBackend(f"unix://{path}?db=0", prefix="unix-test:")
        received = []
        backend.start(lambda channel, message, *position: received.append(message))
        try:
            backend.subscribe("/room")
            backend.publish("/room", "over a unix socket")
            backend.publish("/room", b"\x00binary")
            deadline = time.monotonic() + 5
            while len(received) < 2 and time.monotonic() < deadline:
                green.sleep(0.01)
            assert received == ["over a unix socket", b"\x00binary"]
        finally:
            backend.close()


def _self_signed_certificate(directory):
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def test_rediss_url_speaks_tls(tmp_path):
    cert, key = _self_signed_certificate(tmp_path)
    tls_port = free_port()
    tls = [
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(cert),
        "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert),
        "--tls-auth-clients", "no",
    ]  # fmt: skip
    with RedisServer(extra_args=tls):
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        backend = RedisBackend(url, prefix="tls-test:")
        received = []
        backend.start(lambda channel, message, *position: received.append(message))
        try:
            backend.subscribe("/room")
            backend.publish("/room", "over TLS")
            deadline = time.monotonic() + 5
            while not received and time.monotonic() < deadline:
                green.sleep(0.01)
            assert received == ["over TLS"]
        finally:
            backend.close()
