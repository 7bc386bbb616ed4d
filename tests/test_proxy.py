"""Behind a real nginx terminating TLS, as docs/howto/deploy.rst sets it up:
with ``trusted_proxies`` the application believes the proxy's
X-Forwarded-Proto and X-Forwarded-For (URLs say https and wss, the access
log names the client once); without it, a client's own headers are ignored.
"""

import os
import shutil
import signal
import socket
import ssl
import subprocess

import pytest

from tests.backends.test_redis_transports import _self_signed_certificate
from tests.clients import ServerProcess, connect, free_port, wait_until
from tests.test_access_log import line_with, serve

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

#: Seconds anything here may take.
DEADLINE = 30

#: The proxy's configuration: the deploy how-to's location block, on TLS.
NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    upstream myapp {{ server 127.0.0.1:{app_port}; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://myapp;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 1h;
        }}
    }}
}}
"""


@pytest.fixture
def nginx(tmp_path):
    """``start(app_port)`` -> the TLS port of a private nginx in front of it."""
    if not os.access(NGINX, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (.ci/run installs it)")
        pytest.skip("nginx is not installed")
    processes = []

    def start(app_port):
        cert, key = _self_signed_certificate(tmp_path)
        port = free_port()
        conf = tmp_path / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                dir=tmp_path, app_port=app_port, port=port, cert=cert, key=key
            )
        )
        process = subprocess.Popen(
            [NGINX, "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "e")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        wait_until(
            lambda: ServerProcess._accepts(port), DEADLINE, message="nginx listening"
        )
        return port

    yield start
    for process in processes:
        process.send_signal(signal.SIGQUIT)  # nginx's graceful stop
        try:
            process.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tls_context():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def hixie75_location(port):
    """The WebSocket-Location a hixie-75 handshake through the proxy gets."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    with tls_context().wrap_socket(raw) as sock:
        sock.sendall(
            (
                "GET /echo HTTP/1.1\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n"
                f"Host: 127.0.0.1:{port}\r\nOrigin: https://127.0.0.1:{port}\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed after {head!r}"
            head += chunk
    for line in head.decode("latin-1").split("\r\n"):
        if line.lower().startswith("websocket-location:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no WebSocket-Location in {head!r}")


def app_port(server):
    return int(server.url.rsplit(":", 1)[1])


@pytest.fixture(params=["eventlet", "gevent"])
def runtime(request):
    """stargate's server on each runtime."""
    return request.param


def test_behind_tls_the_app_believes_a_trusted_proxy(tmp_path, nginx, runtime):
    server = serve(tmp_path, server="trusted_proxies = 127.0.0.1", runtime=runtime)
    try:
        port = nginx(app_port(server))
        assert hixie75_location(port) == f"wss://127.0.0.1:{port}/echo"
        url = f"wss://127.0.0.1:{port}/echo"
        with connect(url, ssl=tls_context(), origin=f"https://127.0.0.1:{port}") as ws:
            ws.send("through nginx")
            assert ws.recv(timeout=DEADLINE) == "through nginx"
        line = line_with(server, '"WebSocket /echo" rfc6455 closed')
        assert ' 127.0.0.1 "WebSocket' in line  # once, not 127.0.0.1,127.0.0.1
        request = line_with(server, '"GET /echo HTTP/1.1" 101')
        assert "127.0.0.1,127.0.0.1" not in request
    finally:
        server.stop()


def test_an_untrusted_peer_cannot_claim_https(tmp_path, runtime):
    server = serve(tmp_path, server="trusted_proxies = 192.0.2.1", runtime=runtime)
    try:
        port = app_port(server)
        raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        with raw as sock:
            sock.sendall(
                (
                    "GET /echo HTTP/1.1\r\nUpgrade: WebSocket\r\n"
                    f"Connection: Upgrade\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Origin: http://127.0.0.1:{port}\r\n"
                    "X-Forwarded-Proto: https\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n"
                ).encode()
            )
            head = sock.recv(4096)
        assert f"WebSocket-Location: ws://127.0.0.1:{port}/echo".encode() in head
    finally:
        server.stop()


def test_a_bad_trusted_proxies_value_is_refused(tmp_path, runtime):
    from tests.test_config import assert_one_line, pserve, run_refused, write_ini

    ini = write_ini(tmp_path, server="trusted_proxies = proxy.example", runtime=runtime)
    status, _, err = run_refused(pserve(ini))
    assert_one_line(status, err, ["trusted_proxies", "'proxy.example'", "IP address"])


@pytest.mark.parametrize("worker", ["gevent", "eventlet"])
def test_gunicorn_behind_tls(nginx, worker):
    """gunicorn's green workers behind the same nginx (docs/howto/gunicorn.rst):
    gunicorn believes X-Forwarded-Proto from 127.0.0.1 by itself, so the
    page's https origin is the application's own (not refused with 403),
    and SIGTERM's 1001 reaches the client through the proxy."""
    from tests.test_gunicorn import assert_going_away, gunicorn_server

    with gunicorn_server(
        "-k", worker, "-c", "python:stargate.gunicorn", "stargate.demo:make_app()"
    ) as server:  # fmt: skip
        port = nginx(app_port(server))
        url = f"wss://127.0.0.1:{port}/echo"
        with connect(url, ssl=tls_context(), origin=f"https://127.0.0.1:{port}") as ws:
            ws.send("through nginx")
            assert ws.recv(timeout=DEADLINE) == "through nginx"
            server.signal(signal.SIGTERM)
            assert_going_away(ws)
        assert server.wait(DEADLINE) == 0


def test_the_deploy_howto_has_the_proxy_lines_tested_here():
    """The nginx lines this test runs are those docs/howto/deploy.rst gives."""
    import pathlib

    howto = pathlib.Path(__file__).parent.parent / "docs" / "howto" / "deploy.rst"
    text = howto.read_text(encoding="utf-8")
    tested = [
        line.strip().replace("{{", "{")
        for line in NGINX_CONF.splitlines()
        if line.strip().startswith(("proxy_", "map ", "default upgrade", "''"))
        and "read_timeout" not in line
        and "temp_path" not in line
    ]
    assert len(tested) >= 9
    for line in tested:
        assert line in text, f"deploy.rst lacks {line!r}"
    assert "trusted_proxies = 127.0.0.1" in text
    assert "inside nginx's ``http { }`` block" in text
