"""The documentation: it builds without a warning, documents every name of
the 2010 API reference and every setting, and its examples run."""

import dataclasses
import html as html_module
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import time

import eventlet
import pytest

from stargate.config import PREFIX, Settings
from stargate.exceptions import BackendUnavailable
from stargate.hub import get_hub
from stargate.testing.client import UpgradeRefused, connect
from stargate.testing.server import LiveServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"

#: Every name the 2010 API reference (seed/stargate-api-reference.txt)
#: documents, under the module it documents it in.
SEED_NAMES = [
    "stargate.is_websocket",
    "stargate.WebSocketView",
    "stargate.WebSocketAwareResource",
    "stargate.resource.WebSocketAwareResource",
    "stargate.resource.WebSocketAwareResource.add_listener",
    "stargate.resource.WebSocketAwareResource.listeners",
    "stargate.resource.WebSocketAwareResource.remove_listener",
    "stargate.resource.WebSocketAwareResource.send",
    "stargate.view.IncorrectlyConfigured",
    "stargate.view.WebSocketView",
    "stargate.view.WebSocketView.handle_upgrade",
    "stargate.view.WebSocketView.handle_websocket",
    "stargate.view.WebSocketView.handler",
    "stargate.factory.server_factory",
    "stargate.handshake.HandShakeFailed",
    "stargate.handshake.InvalidOrigin",
    "stargate.handshake.build_location_url",
    "stargate.handshake.handshake_pre76",
    "stargate.handshake.handshake_v76",
    "stargate.handshake.websocket_handshake",
]

#: Names added since 2010 that the reference must document too.
NEW_NAMES = [
    "stargate.exceptions.StargateError",
    "stargate.exceptions.BackendUnavailable",
    "stargate.connection.WebSocket",
    "stargate.connection.WebSocket.send_prepared",
    "stargate.connection.SendResult",
    "stargate.hub.Hub",
    "stargate.hub.HubStats",
    "stargate.backends.base.Backend",
    "stargate.backends.memory.MemoryBackend",
    "stargate.backends.redis.RedisBackend",
    "stargate.frames.encode_message",
    "stargate.protocol.ServerProtocol",
    "stargate.deflate.negotiate",
    "stargate.handshake.negotiate",
    "stargate.config.Settings",
    "stargate.testing.server.LiveServer",
    "stargate.testing.client.connect",
    "stargate.testing.client.UpgradeRefused",
]


def load_example(name):
    """Import ``docs/examples/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(
        f"docs_example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Pyramid looks its caller up there
    spec.loader.exec_module(module)
    return module


# -- the build ----------------------------------------------------------------


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    """Build the HTML once; fail with Sphinx's warnings if there are any."""
    pytest.importorskip("sphinx", reason="the docs extra is not installed")
    out = tmp_path_factory.mktemp("html")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
        + ["-d", str(out / ".doctrees"), str(DOCS), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert result.returncode == 0 and not warnings, (
        "sphinx-build -W failed:\n" + result.stderr[-5000:]
    )
    return out


def page_text(path):
    """The text of an HTML page, tags removed, whitespace collapsed."""
    text = re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8"))
    return " ".join(html_module.unescape(text).split())


def ids_in(directory):
    ids = set()
    for page in directory.rglob("*.html"):
        ids.update(re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8")))
    return ids


@pytest.fixture(scope="module")
def reference_ids(html):
    return ids_in(html / "reference")


def test_builds_without_warnings(html):
    assert (html / "index.html").exists()


@pytest.mark.parametrize("name", SEED_NAMES)
def test_every_name_of_the_2010_reference_is_documented(reference_ids, name):
    assert name in reference_ids


@pytest.mark.parametrize("name", NEW_NAMES)
def test_names_added_since_are_documented(reference_ids, name):
    assert name in reference_ids


def test_every_setting_is_on_the_settings_page(html):
    ids = ids_in(html / "reference")
    page = page_text(html / "reference" / "settings.html")
    for field in dataclasses.fields(Settings):
        if field.name == "backend_options":
            assert "confval-stargate.backend.-option" in ids
            continue
        name = PREFIX + field.name
        assert f"confval-{name}" in ids, f"{name} is not on the settings page"
        assert f"{name} = " in page, f"{name} has no .ini example"
        assert f'"{name}": ' in page, f"{name} has no Python example"


def test_every_redis_option_is_on_the_settings_page(html):
    import inspect

    from stargate.backends.redis import RedisBackend

    page = page_text(html / "reference" / "settings.html")
    options = inspect.signature(RedisBackend).parameters
    for name in options:
        if name not in ("url", "options"):
            assert f"stargate.backend.{name}" in page


# -- the examples ---------------------------------------------------------------


def test_quickstart_two_clients_talk():
    app = load_example("quickstart_app").make_app()
    with LiveServer(app) as server:
        with (
            connect(server.ws_url("/chat"), origin=server.url) as alice,
            connect(server.ws_url("/chat"), origin=server.url) as bob,
        ):
            alice.send("hello from alice")
            assert bob.receive() == "hello from alice"
            assert alice.receive() == "hello from alice"
            bob.send("hi alice")
            assert alice.receive() == "hi alice"


def test_quickstart_serves_its_page():
    import urllib.request

    app = load_example("quickstart_app").make_app()
    with LiveServer(app) as server:
        with urllib.request.urlopen(server.http_url("/"), timeout=5) as response:
            body = response.read().decode("utf-8")
    assert 'new WebSocket(scheme + location.host + "/chat")' in body


def test_the_testing_howto_example_passes():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + [str(EXAMPLES / "test_chat.py"), str(EXAMPLES / "test_chat_fixtures.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "7 passed" in result.stdout


def test_a_page_of_another_site_is_refused_by_default():
    app = load_example("quickstart_app").make_app()
    with LiveServer(app) as server:
        with pytest.raises(UpgradeRefused) as refused:
            connect(server.ws_url("/chat"), origin="https://evil.example")
    assert refused.value.status == 403


def test_the_custom_backend_serves_an_application():
    load_example("custom_backend")
    app = load_example("quickstart_app").make_app(
        {
            "stargate.backend": "docs_example_custom_backend:QueueBackend",
            "stargate.backend.max_queue": "100",
        }
    )
    hub = get_hub(app.registry)
    assert type(hub.backend).__name__ == "QueueBackend"
    assert hub.backend.max_queue == 100
    try:
        with LiveServer(app) as server:
            with (
                connect(server.ws_url("/chat")) as alice,
                connect(server.ws_url("/chat")) as bob,
            ):
                for n in range(20):
                    alice.send(f"line {n}")
                expected = [f"line {n}" for n in range(20)]
                assert bob.receive_many(20) == expected
                assert alice.receive_many(20) == expected
        assert hub.stats.delivered == 40
    finally:
        hub.close()
    with pytest.raises(BackendUnavailable):
        hub.backend.publish("chat", "after close")


def test_the_custom_backend_delivers_later_and_in_order():
    QueueBackend = load_example("custom_backend").QueueBackend
    backend = QueueBackend()
    received = []
    backend.start(lambda channel, message: received.append((channel, message)))
    backend.subscribe("a")
    backend.publish("a", "one")
    backend.publish("b", "not subscribed")
    backend.publish("a", b"two")
    assert received == []  # publish returned before delivery
    deadline = time.monotonic() + 10
    while len(received) < 2 and time.monotonic() < deadline:
        eventlet.sleep(0.01)
    assert received == [("a", "one"), ("a", b"two")]
    backend.close()
    backend.close()


def test_every_command_option_is_documented(html):
    from stargate.__main__ import build_parser

    ids = ids_in(html / "reference")
    parser = build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    for action in demo._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert f"cmdoption-stargate-demo-{option.lstrip('-')}" in ids, option


def test_every_benchmark_is_documented(html):
    main = pytest.importorskip("benchmarks.__main__")
    page = (html / "reference" / "commands.html").read_text(encoding="utf-8")
    for name in main.BENCHMARKS:
        assert f'<span class="pre">{name}</span>' in page, f"{name} is undocumented"
