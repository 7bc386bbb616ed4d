"""WebSocketView against real clients on a live eventlet server."""

import base64
import logging
import os
import socket
import struct
import time

import pytest
import websockets.exceptions
from pyramid.authorization import ACLHelper, Allow, Authenticated, Everyone
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.request import Request

from stargate import WebSocketView, is_websocket
from stargate.testing.client import ReceiveTimeout, UpgradeRefused, connect
from stargate.testing.server import LiveServer
from stargate.view import open_connections


class Echo(WebSocketView):
    subprotocols = ("chat.v2", "chat.v1")

    def handler(self, websocket):
        while (message := websocket.wait()) is not None:
            if message == "close-please":
                websocket.close(4000, "asked to")
                return
            if message == "raise":
                raise RuntimeError("the handler broke")
            if message == "return":
                return
            if message == "subprotocol?":
                message = str(websocket.subprotocol)
            websocket.send(message)


class Page:
    def __init__(self, request):
        self.request = request

    def __call__(self):
        return {"page": True}


class SecretPolicy:
    """Authenticated when the request has the cookie ``token=sesame``."""

    def identity(self, request):
        return request.cookies.get("token") == "sesame" or None

    def authenticated_userid(self, request):
        return "user" if self.identity(request) else None

    def permits(self, request, context, permission):
        principals = [Everyone]
        if self.identity(request):
            principals.append(Authenticated)
        return ACLHelper().permits(context, principals, permission)


class Root:
    __acl__ = [(Allow, Authenticated, "listen")]


def make_app(**settings):
    with Configurator(settings=settings, root_factory=lambda request: Root()) as config:
        config.include("stargate")
        config.set_security_policy(SecretPolicy())
        config.add_route("echo", "/echo")
        config.add_view(Echo, route_name="echo")
        config.add_route("both", "/both")
        config.add_view(Echo, route_name="both", websocket=True)
        config.add_view(Page, route_name="both", websocket=False, renderer="json")
        config.add_route("only", "/only")
        config.add_view(Echo, route_name="only", websocket=True)
        config.add_route("posts", "/posts")
        config.add_view(Page, route_name="posts", request_method="POST")
        config.add_route("secret", "/secret")
        config.add_view(Echo, route_name="secret", permission="listen")
        return config.make_wsgi_app()


@pytest.fixture
def server():
    with LiveServer(make_app()) as live:
        yield live


def raw_request(server, request, read_timeout=5.0):
    """Send raw bytes, return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        sock.settimeout(read_timeout)
        chunks = []
        deadline = time.monotonic() + read_timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"101" not in chunks[0][:15]:
                body = b"".join(chunks)
                head, _, rest = body.partition(b"\r\n\r\n")
                length = _content_length(head)
                if length is not None and len(rest) >= length:
                    break
        return b"".join(chunks)


def raw_until_closed(sock, timeout=5.0):
    """Read until the server closes the connection (bounded by ``timeout``)."""
    data = b""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _content_length(head):
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None


def upgrade_request(path="/echo", **overrides):
    headers = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    for name, value in overrides.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class TestMessages:
    def test_text_and_binary_keep_their_type(self, server):
        with connect(server.ws_url("/echo")) as client:
            client.send("héllo")
            assert client.receive() == "héllo"
            client.send(b"\x00\xffbytes")
            assert client.receive() == b"\x00\xffbytes"

    def test_a_message_at_the_limit_passes_and_one_over_closes_1009(self, server):
        with connect(server.ws_url("/echo"), compression=False) as client:
            client.send(b"x" * 2**20)
            assert client.receive(timeout=10) == b"x" * 2**20
            client.send(b"x" * (2**20 + 1))
            assert client.wait_closed() == (1009, client.close_reason)

    def test_16_mib_where_the_limit_allows(self):
        app = make_app(**{"stargate.max_message_size": str(2**24)})
        with LiveServer(app) as live:
            client = connect(live.ws_url("/echo"), max_size=2**25)
            payload = os.urandom(2**24)
            client.send(payload)
            assert client.receive(timeout=30) == payload
            client.close()

    def test_fragmented_message_is_reassembled(self, server):
        with connect(server.ws_url("/echo")) as client:
            client.connection.send(["frag", "mented ", "text"])
            assert client.receive() == "fragmented text"
            client.connection.send([b"a", b"b", b"c"])
            assert client.receive() == b"abc"

    def test_compression_is_negotiated_and_round_trips(self, server):
        with connect(server.ws_url("/echo"), compression=True) as client:
            extensions = client.response_headers.get("Sec-WebSocket-Extensions")
            assert "permessage-deflate" in extensions
            assert "server_no_context_takeover" in extensions
            for _ in range(3):  # the client keeps its context across messages
                client.send("compress me " * 1000)
                assert client.receive() == "compress me " * 1000

    def test_uncompressed_when_the_client_does_not_offer_it(self, server):
        with connect(server.ws_url("/echo"), compression=False) as client:
            assert "Sec-WebSocket-Extensions" not in client.response_headers
            client.send("plain")
            assert client.receive() == "plain"

    def test_ping_gets_a_pong(self, server):
        with connect(server.ws_url("/echo")) as client:
            assert client.ping(b"are you there") < 5

    def test_subprotocol_is_the_servers_preference_among_the_offered(self, server):
        url = server.ws_url("/echo")
        with connect(url, subprotocols=["chat.v1", "chat.v2"]) as client:
            assert client.subprotocol == "chat.v2"
            client.send("subprotocol?")
            assert client.receive() == "chat.v2"
        with connect(url, subprotocols=["other"]) as client:
            assert client.subprotocol is None


class TestClosing:
    def test_client_close_is_answered(self, server):
        client = connect(server.ws_url("/echo"))
        client.close(1000, "bye")
        assert client.close_code == 1000

    def test_handler_closes_with_its_code_and_reason(self, server):
        with connect(server.ws_url("/echo")) as client:
            client.send("close-please")
            assert client.wait_closed() == (4000, "asked to")

    def test_handler_returning_closes_with_1000(self, server):
        with connect(server.ws_url("/echo")) as client:
            client.send("return")
            assert client.wait_closed()[0] == 1000

    def test_handler_raising_closes_with_1011_and_logs_the_traceback(
        self, server, caplog
    ):
        with caplog.at_level(logging.ERROR, logger="stargate.view"):
            with connect(server.ws_url("/echo")) as client:
                client.send("raise")
                assert client.wait_closed()[0] == 1011
        assert "the handler broke" in caplog.text
        assert "Traceback" in caplog.text

    def test_a_client_that_sends_then_closes_is_no_error(self, server, caplog):
        # The echo's send() meets a closed connection: ConnectionClosed is
        # an expected end, logged in one DEBUG line, not an ERROR.
        from stargate.frames import Frame, Opcode, serialize_frame

        mask = b"\x11\x22\x33\x44"
        hello = serialize_frame(Frame(Opcode.TEXT, b"hi"), mask)
        bye = serialize_frame(Frame(Opcode.CLOSE, b"\x03\xe8"), mask)
        with caplog.at_level(logging.DEBUG, logger="stargate"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(upgrade_request())
                assert s.recv(4096).startswith(b"HTTP/1.1 101")
                s.sendall(hello + bye)
                raw_until_closed(s)
            deadline = time.monotonic() + 5
            while open_connections() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert open_connections() == 0
        records = [r for r in caplog.records if r.name.startswith("stargate")]
        assert [r for r in records if r.levelno >= logging.WARNING] == []
        ended = [r for r in records if "client closed the connection" in r.message]
        assert len(ended) == 1 and ended[0].levelno == logging.DEBUG
        assert ended[0].exc_info is None

    def test_open_connection_count_returns_to_zero(self, server):
        clients = [connect(server.ws_url("/echo")) for _ in range(5)]
        for client in clients:
            client.send("x")
            assert client.receive() == "x"
        assert open_connections() == 5
        for client in clients:
            client.close()
        deadline = time.monotonic() + 5
        while open_connections() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert open_connections() == 0

    def test_peer_that_vanishes_ends_the_handler(self, server):
        request = upgrade_request()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        assert open_connections() == 1
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST, no close frame
        deadline = time.monotonic() + 5
        while open_connections() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert open_connections() == 0


class TestKeepalive:
    def test_a_peer_that_never_answers_pings_is_dropped(self):
        app = make_app(
            **{"stargate.ping_interval": "0.2", "stargate.ping_timeout": "0.3"}
        )
        with LiveServer(app) as live:
            with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
                sock.sendall(upgrade_request())
                response = sock.recv(4096)
                assert response.startswith(b"HTTP/1.1 101")
                received = b""
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    received += chunk
                # At least one unmasked ping (0x89, empty) then the server gave up.
                assert b"\x89\x00" in received
                assert time.monotonic() < deadline

    def test_a_peer_that_answers_pings_stays(self):
        app = make_app(
            **{"stargate.ping_interval": "0.1", "stargate.ping_timeout": "1.0"}
        )
        with LiveServer(app) as live, connect(live.ws_url("/echo")) as client:
            # Several ping rounds, longer than a peer that does not answer
            # would last (ping_interval + ping_timeout).
            time.sleep(1.5)
            client.send("still here")
            assert client.receive() == "still here"


class TestRefusals:
    def test_plain_get_gets_426_with_a_readable_body(self, server):
        response = raw_request(server, b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 426")
        assert b"WebSocket endpoint" in response
        assert b"Upgrade: websocket" in response

    def test_malformed_key_gets_400_with_the_reason(self, server):
        response = raw_request(server, upgrade_request(Sec_WebSocket_Key="short"))
        assert response.startswith(b"HTTP/1.1 400")
        assert b"Sec-WebSocket-Key" in response

    def test_unsupported_version_gets_426_naming_13(self, server):
        response = raw_request(server, upgrade_request(Sec_WebSocket_Version="8"))
        assert response.startswith(b"HTTP/1.1 426")
        assert b"Sec-WebSocket-Version: 13" in response

    def test_http_1_0_upgrade_is_refused(self, server):
        request = upgrade_request().replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        response = raw_request(server, request)
        assert b" 400 " in response.split(b"\r\n")[0]
        assert b"HTTP/1.1" in response  # the reason names the required version

    def test_cross_origin_browser_gets_403(self, server):
        with pytest.raises(UpgradeRefused) as refused:
            connect(server.ws_url("/echo"), origin="https://evil.example")
        assert refused.value.status == 403
        assert b"evil.example" in refused.value.body

    def test_same_origin_browser_is_accepted(self, server):
        origin = f"http://127.0.0.1:{server.port}"
        with connect(server.ws_url("/echo"), origin=origin) as client:
            client.send("ok")
            assert client.receive() == "ok"

    def test_allowed_origins_setting(self):
        app = make_app(**{"stargate.allowed_origins": "https://app.example"})
        with LiveServer(app) as live:
            with connect(live.ws_url("/echo"), origin="https://app.example") as c:
                c.send("ok")
                assert c.receive() == "ok"
            with pytest.raises(UpgradeRefused) as refused:
                connect(live.ws_url("/echo"), origin=f"http://127.0.0.1:{live.port}")
            assert refused.value.status == 403

    def test_max_connections_gives_503_before_upgrading(self):
        app = make_app(**{"stargate.max_connections": "2"})
        with LiveServer(app) as live:
            first = connect(live.ws_url("/echo"))
            second = connect(live.ws_url("/echo"))
            with pytest.raises(UpgradeRefused) as refused:
                connect(live.ws_url("/echo"))
            assert refused.value.status == 503
            first.close()
            second.close()

    def test_server_still_serves_after_bad_requests(self, server):
        for request in (
            b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n",
            upgrade_request(Sec_WebSocket_Key=None),
            b"\x16\x03\x01garbage\r\n\r\n",
        ):
            raw_request(server, request, read_timeout=1)
        with connect(server.ws_url("/echo")) as client:
            client.send("alive")
            assert client.receive() == "alive"


class TestPyramidIntegration:
    def test_permission_applies_to_the_upgrade(self, server):
        with pytest.raises(UpgradeRefused) as refused:
            connect(server.ws_url("/secret"))
        assert refused.value.status == 403
        headers = {"Cookie": "token=sesame"}
        with connect(server.ws_url("/secret"), headers=headers) as client:
            client.send("in")
            assert client.receive() == "in"

    def test_websocket_predicate_routes_upgrades_and_pages_apart(self, server):
        with connect(server.ws_url("/both")) as client:
            client.send("ws")
            assert client.receive() == "ws"
        page = raw_request(server, b"GET /both HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert page.startswith(b"HTTP/1.1 200")
        assert b'{"page": true}' in page

    def test_a_websocket_only_route_answers_a_plain_get_with_426(self, server):
        # The predicate used to pass the view over, and Pyramid said 404.
        get = b"GET /only HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        response = raw_request(server, get)
        assert response.startswith(b"HTTP/1.1 426"), response[:200]
        assert b"this is a WebSocket endpoint" in response
        assert b"\r\nUpgrade: websocket\r\n" in response
        with connect(server.ws_url("/only")) as client:
            client.send("ws")
            assert client.receive() == "ws"

    def test_other_predicate_mismatches_stay_404(self, server):
        get = b"GET /posts HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        assert raw_request(server, get).startswith(b"HTTP/1.1 404")

    def test_predicate_value_must_be_a_bool(self):
        with Configurator() as config:
            config.include("stargate")
            config.add_route("x", "/x")
            config.add_view(Echo, route_name="x", websocket="yes")
            with pytest.raises(ConfigurationError, match="True or False"):
                config.commit()

    def test_is_websocket_stays_callable_as_documented(self):
        upgrade = Request.blank(
            "/", headers={"Upgrade": "WebSocket", "Connection": "keep-alive, Upgrade"}
        )
        assert is_websocket(None, upgrade) is True
        assert is_websocket(None, Request.blank("/")) is False

    def test_view_outside_eventlet_refuses_with_501_naming_the_server(self):
        request = Request.blank(
            "/echo",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": base64.b64encode(b"k" * 16).decode(),
                "Sec-WebSocket-Version": "13",
            },
            environ={"SERVER_PROTOCOL": "HTTP/1.1", "SERVER_SOFTWARE": "waitress"},
        )
        request.registry = make_app().registry
        response = Echo(request)()
        assert response.status_code == 501
        assert "waitress cannot carry a WebSocket" in response.detail
        assert "egg:stargate#main" in response.detail

    def test_default_handler_says_what_to_override(self, server):
        class Bare(WebSocketView):
            pass

        with Configurator() as config:
            config.include("stargate")
            config.add_route("bare", "/bare")
            config.add_view(Bare, route_name="bare")
            app = config.make_wsgi_app()
        with LiveServer(app) as live, connect(live.ws_url("/bare")) as client:
            assert client.wait_closed()[0] == 1011


def test_receive_timeout_is_named(server):
    with connect(server.ws_url("/echo")) as client:
        with pytest.raises(ReceiveTimeout):
            client.receive(timeout=0.1)


def test_client_sees_connection_closed_after_server_close(server):
    with connect(server.ws_url("/echo")) as client:
        client.send("close-please")
        client.wait_closed()
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            client.send("late")


def test_half_a_handshake_is_dropped_after_the_request_timeout():
    with LiveServer(make_app(), request_timeout=0.3) as live:
        # The socket's own timeout is the deadline: recv raises if the
        # server never hangs up.
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr")
            assert sock.recv(4096) == b""  # the server hung up


def test_an_upgraded_socket_outlives_the_request_timeout():
    # request_timeout must let the handshake through on a busy machine; the
    # connection then lives past it.
    with LiveServer(make_app(), request_timeout=1.0) as live:
        with connect(live.ws_url("/echo")) as client:
            time.sleep(1.5)
            client.send("still open")
            assert client.receive() == "still open"
