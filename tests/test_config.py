"""Settings are checked at start-up: a bad value is refused with one line
naming the setting, the value and what is allowed, under ``pserve`` and
``stargate demo`` alike, never accepted and never a traceback."""

import importlib.metadata
import subprocess
import sys
import textwrap

import pytest
from pyramid.config import Configurator

from stargate.config import parse_settings
from stargate.exceptions import IncorrectlyConfigured
from tests.clients import ServerProcess, free_port, stargate_command, wait_until

#: Seconds a refusing server may take to exit (it imports Pyramid first).
EXIT_TIMEOUT = 60

#: (where, line of the .ini, what the one line must say)
BAD = {
    "compression": (
        "app",
        "stargate.compression = flase",
        ["stargate.compression", "'flase'", "true or false"],
    ),
    "allowed_origins without a scheme": (
        "app",
        "stargate.allowed_origins = example.com",
        ["stargate.allowed_origins", "'example.com'", "scheme://host[:port]"],
    ),
    "misspelt backend option": (
        "app",
        "stargate.backend = redis://127.0.0.1:1/0\nstargate.backend.presense_ttl = 5",
        ["stargate.backend.presense_ttl", "presence_ttl"],
    ),
    "backend port not a number": (
        "app",
        "stargate.backend = redis://user:secret@127.0.0.1:63xx/0",
        ["stargate.backend", "'63xx'", "port 1-65535"],
    ),
    "protocols": (
        "app",
        "stargate.protocols = 13 hixie-77",
        ["stargate.protocols", "'13 hixie-77'", "rfc6455, hixie-76 and hixie-75"],
    ),
    "access_log": (
        "server",
        "access_log = flase",
        ["access_log", "'flase'", "true or false"],
    ),
    "shutdown_timeout": (
        "server",
        "shutdown_timeout = abc",
        ["shutdown_timeout", "'abc'", "positive number of seconds"],
    ),
    "request_timeout": (
        "server",
        "request_timeout = abc",
        ["request_timeout", "'abc'", "positive number of seconds"],
    ),
}


#: Logging sections for an .ini: INFO and up on stderr, one date per line.
LOGGING = """
[loggers]
keys = root

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = INFO
handlers = console

[handler_console]
class = StreamHandler
args = (sys.stderr,)
formatter = generic

[formatter_generic]
format = %(asctime)s %(levelname)s [%(name)s] %(message)s
"""


#: The runtimes stargate's server runs on, and the entry point of each.
SERVER_RUNTIMES = {"eventlet": "egg:stargate#main", "gevent": "egg:stargate#gevent"}


def write_ini(tmp_path, app="", server="", port=None, logging=False, runtime=None):
    """The demo under ``pserve`` with extra ``app`` and ``server`` lines; with
    ``logging``, the logging sections too (else pserve's default: WARNING).
    ``runtime`` picks the entry point (:data:`SERVER_RUNTIMES`; eventlet's
    by default)."""
    ini = tmp_path / "server.ini"
    ini.write_text(
        textwrap.dedent(
            """\
            [app:main]
            use = egg:stargate#demo
            {app}

            [server:main]
            use = {use}
            host = 127.0.0.1
            port = {port}
            {server}
            """
        ).format(
            app=app,
            server=server,
            port=port or free_port(),
            use=SERVER_RUNTIMES[runtime or "eventlet"],
        )
        + (LOGGING if logging else ""),
        encoding="utf-8",
    )
    return ini


def run_refused(command):
    """Run a server that must refuse to start; its exit status and stderr."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the server started instead of refusing:\n{out}{err}")
    return process.returncode, out, err


def pserve(ini):
    return [sys.executable, "-W", "ignore", "-m", "pyramid.scripts.pserve", str(ini)]


def assert_one_line(status, err, expected):
    # pserve says "Starting server in PID N." before it runs the server
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("Starting")]
    assert status != 0
    assert len(lines) == 1, f"not one line:\n{err}"
    for text in expected:
        assert text in lines[0], f"{text!r} missing from {lines[0]!r}"
    assert "secret" not in err  # a password in a URL stays out of the logs


@pytest.mark.parametrize("runtime", sorted(SERVER_RUNTIMES))
@pytest.mark.parametrize("case", sorted(BAD))
def test_pserve_refuses_a_bad_setting_in_one_line(tmp_path, case, runtime):
    where, line, expected = BAD[case]
    ini = write_ini(tmp_path, runtime=runtime, **{where: line})
    status, _, err = run_refused(pserve(ini))
    assert_one_line(status, err, expected)


def test_pserve_refuses_an_unknown_runtime_in_one_line(tmp_path):
    ini = write_ini(tmp_path, server="runtime = tornado")
    status, _, err = run_refused(pserve(ini))
    assert_one_line(status, err, ["runtime", "'tornado'", "eventlet or gevent"])


def test_the_gevent_entry_point_refuses_another_runtime_in_one_line(tmp_path):
    ini = write_ini(tmp_path, server="runtime = eventlet", runtime="gevent")
    status, _, err = run_refused(pserve(ini))
    assert_one_line(status, err, ["runtime", "'eventlet'", "egg:stargate#main"])


def test_stargate_demo_refuses_an_unknown_runtime():
    status, _, err = run_refused(stargate_command("demo", "--runtime", "tornado"))
    assert status == 2
    assert "--runtime" in err and "tornado" in err


def test_stargate_demo_refuses_a_bad_setting_in_one_line():
    status, _, err = run_refused(
        stargate_command("demo", "--port", "0", "--set", "stargate.compression=flase")
    )
    assert status == 1
    assert_one_line(status, err, BAD["compression"][2])


@pytest.mark.parametrize("runtime", sorted(SERVER_RUNTIMES))
def test_a_busy_port_is_one_line_naming_the_address(tmp_path, runtime):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ini = write_ini(tmp_path, port=port, runtime=runtime)
        status, _, err = run_refused(pserve(ini))
        assert_one_line(status, err, [f"127.0.0.1:{port}", "in use"])


# -- the same rules, in process -------------------------------------------------


@pytest.mark.parametrize(
    "value, expected", [("true", True), ("Off", False), ("1", True), ("no", False)]
)
def test_booleans_take_the_usual_words(value, expected):
    assert parse_settings({"stargate.compression": value}).compression is expected


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("stargate.compression", "flase", "true or false"),
        ("stargate.own_green_thread", "sure", "true or false"),
        ("stargate.ping_timeout", "abc", "positive number of seconds"),
        ("stargate.ping_interval", "nan", "positive number of seconds, or 'off'"),
        ("stargate.close_timeout", "-1", "positive number of seconds"),
        ("stargate.max_send_buffer", "1.5", "positive whole number of bytes"),
        ("stargate.max_connections", "-3", "0 (no limit)"),
        ("stargate.allowed_origins", "https://ok.example example.com", "scheme://"),
        ("stargate.backend", "rediss://h:port/0", "port 1-65535"),
        ("stargate.backend", "redis+streams://h:6379/zero", "db 0, 1"),
        ("stargate.protocols", "rfc6455 hybi-10", "rfc6455, hixie-76 and hixie-75"),
        ("stargate.protocols", "", "rfc6455, hixie-76 and hixie-75"),
    ],
)
def test_a_bad_value_names_setting_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(IncorrectlyConfigured) as refused:
        parse_settings({key: value})
    message = str(refused.value)
    assert key in message and repr(value) in message and allowed in message


@pytest.mark.parametrize(
    "value, expected",
    [
        ("rfc6455", ("rfc6455",)),
        ("rfc6455 hixie-76", ("rfc6455", "hixie-76")),
        ("RFC6455, hixie-75", ("rfc6455", "hixie-75")),
        # the older numeric names stay aliases, so existing .ini files work
        ("13", ("rfc6455",)),
        ("13 76 75", ("rfc6455", "hixie-76", "hixie-75")),
        ("13 rfc6455 hixie-76 76", ("rfc6455", "hixie-76")),
        (["13", 75], ("rfc6455", "hixie-75")),
    ],
)
def test_protocols_take_the_draft_names_and_their_old_numbers(value, expected):
    assert parse_settings({"stargate.protocols": value}).protocols == expected


def test_protocols_default_to_every_draft_by_name():
    assert parse_settings({}).protocols == ("rfc6455", "hixie-76", "hixie-75")


def test_origins_with_a_scheme_are_accepted():
    settings = parse_settings(
        {"stargate.allowed_origins": "https://example.com http://127.0.0.1:8080"}
    )
    assert settings.allowed_origins == ("https://example.com", "http://127.0.0.1:8080")


@pytest.mark.parametrize("backend", ["memory", "redis://127.0.0.1:1/0"])
def test_a_misspelt_backend_option_is_refused(backend):
    settings = {"stargate.backend": backend, "stargate.backend.prefx": "app:"}
    with pytest.raises(IncorrectlyConfigured) as refused:
        with Configurator(settings=settings) as config:
            config.include("stargate")
    assert "stargate.backend.prefx" in str(refused.value)


def test_a_known_backend_option_is_passed_on():
    settings = {
        "stargate.backend": "redis://127.0.0.1:1/0",
        "stargate.backend.prefix": "app:",
    }
    with Configurator(settings=settings) as config:
        config.include("stargate")
    assert config.registry.stargate_hub.backend.prefix == "app:"


# -- what a server says when it starts -------------------------------------------


def serving_line(server):
    for line in server.lines:
        if "Serving on http://" in line:
            return line
    raise AssertionError(f"no startup line in:\n{server.output}")


@pytest.mark.parametrize("runtime", sorted(SERVER_RUNTIMES))
def test_pserve_says_where_and_how_it_serves_with_credentials_redacted(
    tmp_path, runtime
):
    """The ini has no logging sections, as production.ini did: the line must
    show all the same."""
    port = free_port()
    backend = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    ini = write_ini(
        tmp_path, app=f"stargate.backend = {backend}", port=port, runtime=runtime
    )
    with ServerProcess(pserve(ini), url_pattern=r"Serving on (http://\S+)") as server:
        assert server.wait_ready() == f"http://127.0.0.1:{port}"
        line = serving_line(server)
    assert "1 worker," in line
    assert f"{runtime} {importlib.metadata.version(runtime)}" in line
    assert f"backend redis://:***@127.0.0.1:{backend.rsplit(':', 1)[1]}" in line
    assert "s3cret" not in server.output


def test_several_workers_on_the_memory_backend_are_warned_about(tmp_path):
    ini = write_ini(tmp_path, server="workers = 2")
    with ServerProcess(pserve(ini), url_pattern=r"Serving on (http://\S+)") as server:
        server.wait_ready()
        assert "2 workers," in serving_line(server)
        wait_until(
            lambda: any("2 workers on the memory backend" in ln for ln in server.lines),
            10,
            message="the warning",
        )


def test_stargate_demo_warns_once_about_workers_on_memory():
    with ServerProcess(
        stargate_command("demo", "--port", "0", "--workers", "2"),
        url_pattern=r"stargate demo: (http://\S+)",
    ) as server:
        server.wait_ready()
        warnings = [ln for ln in server.lines if "on the memory backend" in ln]
    assert len(warnings) == 1, server.output
