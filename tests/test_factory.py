"""The server: pserve with the shipped development.ini, ``stargate demo``
with several workers, and how both stop. Real processes, real clients."""

import importlib.resources
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from paste.deploy.loadwsgi import SERVER, loadcontext
from websockets.exceptions import ConnectionClosed

from tests.clients import (
    ServerProcess,
    assert_held_back_until,
    connect,
    free_port,
    http,
    stargate_command,
    wait_until,
)

INI = str(importlib.resources.files("stargate.demo").joinpath("development.ini"))

#: Seconds a server may take to close its WebSockets and exit on SIGTERM.
STOP_TIMEOUT = 5.0


def pserve(*args):
    return [sys.executable, "-W", "ignore", "-m", "pyramid.scripts.pserve", *args]


#: The runtimes stargate's server runs on: each server test runs on both.
RUNTIMES = ["eventlet", "gevent"]


def runtime_ini(runtime, directory, text=None):
    """The shipped development.ini (or ``text``) with the server section on
    ``runtime``: its gevent entry point for gevent."""
    text = Path(INI).read_text() if text is None else text
    if runtime == "eventlet":
        if text == Path(INI).read_text():
            return INI
    else:
        text = text.replace("use = egg:stargate#main", f"use = egg:stargate#{runtime}")
    ini = Path(directory) / f"{runtime}.ini"
    ini.write_text(text)
    return str(ini)


def start_pserve(runtime="eventlet", directory=None):
    port = free_port()
    ini = INI if runtime == "eventlet" else runtime_ini(runtime, directory)
    server = ServerProcess(pserve(ini, f"http_port={port}"), port=port)
    server.wait_ready()
    return server


@pytest.fixture(params=RUNTIMES)
def runtime(request):
    return request.param


@pytest.fixture
def pserved(runtime, tmp_path):
    server = start_pserve(runtime, tmp_path)
    try:
        yield server
    finally:
        server.stop(timeout=5)


class TestDevelopmentIni:
    def server_conf(self, **global_conf):
        return loadcontext(SERVER, "config:" + INI, global_conf=global_conf).local_conf

    def test_it_ships_inside_the_package(self):
        assert os.path.isfile(INI)

    def test_it_serves_on_6543_unless_told_otherwise(self):
        conf = self.server_conf()
        assert (conf["host"], conf["port"]) == ("127.0.0.1", "6543")

    def test_http_port_on_the_pserve_command_line_picks_the_port(self):
        assert self.server_conf(http_port="7001")["port"] == "7001"


class TestPserve:
    def test_it_serves_the_demo_page(self, pserved):
        response = http(pserved.url + "/")
        assert response.status == 200
        assert "stargate chat" in response.text

    def test_echo_text_and_binary(self, pserved):
        with connect(pserved.ws_url + "/echo") as ws:
            ws.send("text over pserve")
            assert ws.recv(timeout=10) == "text over pserve"
            ws.send(b"\xffbinary\x00")
            assert ws.recv(timeout=10) == b"\xffbinary\x00"

    def test_the_access_log_goes_to_the_configured_logging(self, pserved):
        http(pserved.url + "/jobs/logged")
        wait_until(
            lambda: "GET /jobs/logged" in pserved.output, 10, message="access log"
        )

    def test_the_access_log_names_the_forwarded_client_of_a_websocket(self, pserved):
        # Logged when the connection ends, after stargate freed the parsed
        # request headers: X-Forwarded-For still reaches the log line.
        forwarded = {"X-Forwarded-For": "203.0.113.7"}
        with connect(pserved.ws_url + "/echo", additional_headers=forwarded) as ws:
            ws.send("logged")
            assert ws.recv(timeout=10) == "logged"
        wait_until(
            lambda: any(
                '203.0.113.7,127.0.0.1 "GET /echo' in line
                for line in pserved.output.splitlines()
            ),
            10,
            message="access log",
        )

    def test_max_clients_holds_a_connection_back_until_one_ends(
        self, tmp_path, runtime
    ):
        text = Path(INI).read_text()
        ini = runtime_ini(
            runtime,
            tmp_path,
            text.replace("workers = 1\n", "workers = 1\nmax_clients = 2\n"),
        )
        port = free_port()
        with ServerProcess(pserve(ini, f"http_port={port}"), port=port) as server:
            server.wait_ready()
            first = connect(server.ws_url + "/echo")
            second = connect(server.ws_url + "/echo")
            assert_held_back_until(port, first.close)
            second.send("still served")
            assert second.recv(timeout=10) == "still served"
            second.close()

    def test_sigterm_closes_open_websockets_with_1001_and_exits(
        self, runtime, tmp_path
    ):
        server = start_pserve(runtime, tmp_path)
        try:
            first = connect(server.ws_url + "/echo")
            second = connect(server.ws_url + "/rooms/shutdown")
            with first, second:
                first.send("before")
                assert first.recv(timeout=10) == "before"
                started = time.monotonic()
                server.signal(signal.SIGTERM)
                for ws in (first, second):
                    with pytest.raises(ConnectionClosed) as info:
                        ws.recv(timeout=STOP_TIMEOUT)
                    assert info.value.rcvd is not None, "no close frame received"
                    assert info.value.rcvd.code == 1001
            remaining = STOP_TIMEOUT - (time.monotonic() - started)
            assert server.wait(timeout=max(remaining, 0.1)) == 0
        finally:
            server.stop(timeout=5)

    def test_sigterm_on_an_idle_server_exits_at_once(self, runtime, tmp_path):
        server = start_pserve(runtime, tmp_path)
        try:
            with connect(server.ws_url + "/echo") as ws:
                ws.send("x")
                ws.recv(timeout=10)
            time.sleep(0.5)  # the connection has ended; the server is idle
            server.signal(signal.SIGTERM)
            assert server.wait(timeout=STOP_TIMEOUT) == 0
        finally:
            server.stop(timeout=5)


class TestStargateDemoCommand:
    def test_help_lists_the_demo_subcommand(self):
        result = subprocess.run(
            stargate_command("--help"), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0
        assert "demo" in result.stdout

    def test_a_bad_worker_count_is_refused_with_a_message(self):
        result = subprocess.run(
            stargate_command("demo", "--workers", "0"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert "must be a positive integer" in result.stderr

    def test_a_bad_backend_is_refused_with_a_message(self):
        result = subprocess.run(
            stargate_command("demo", "--port", "0", "--backend", "carrier-pigeon"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert "carrier-pigeon" in result.stderr

    def test_it_prints_the_url_it_serves(self, runtime):
        port = free_port()
        with ServerProcess(
            stargate_command("demo", "--port", str(port), "--runtime", runtime),
            url_pattern=r"stargate demo: (http://\S+)",
        ) as server:
            assert server.wait_ready() == f"http://127.0.0.1:{port}"

    def test_stargate_runtime_picks_the_runtime_when_no_option_does(self):
        with ServerProcess(
            stargate_command("demo", "--port", "0"),
            url_pattern=r"stargate demo: (http://\S+)",
            env={**os.environ, "STARGATE_RUNTIME": " Gevent "},
        ) as server:
            server.wait_ready()
            assert "worker(s), gevent;" in server.output

    def test_set_passes_any_stargate_setting(self):
        port = free_port()
        with ServerProcess(
            stargate_command(
                "demo", "--port", str(port), "--set", "stargate.max_message_size=10"
            ),
            url_pattern=r"stargate demo: (http://\S+)",
        ) as server:
            server.wait_ready()
            with connect(f"ws://127.0.0.1:{port}/echo") as client:
                client.send("short")
                assert client.recv(timeout=5) == "short"
                client.send("more than ten bytes")
                with pytest.raises(ConnectionClosed) as closed:
                    client.recv(timeout=5)
                assert closed.value.rcvd.code == 1009

    def test_set_refuses_what_is_not_a_setting(self):
        result = subprocess.run(
            stargate_command("demo", "--set", "max_message_size=10"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert "expected stargate.NAME=VALUE" in result.stderr


def worker_pids(server):
    try:
        return {child.pid for child in psutil.Process(server.pid).children()}
    except psutil.NoSuchProcess:
        return set()


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def two_workers(server, without=None):
    """The two worker pids, once there are two and ``without`` is gone."""
    pids = worker_pids(server)
    if len(pids) == 2 and without not in pids:
        return pids
    return None


class TestWorkers:
    def test_a_killed_worker_is_replaced_and_the_server_keeps_serving(self, runtime):
        server = ServerProcess(
            stargate_command(
                "demo", "--port", "0", "--workers", "2", "--runtime", runtime
            ),
            url_pattern=r"stargate demo: (http://\S+)",
        )
        try:
            server.wait_ready()
            workers = wait_until(lambda: two_workers(server), 20, message="two workers")
            victim = sorted(workers)[0]
            os.kill(victim, signal.SIGKILL)
            replaced = wait_until(
                lambda: two_workers(server, without=victim),
                20,
                message="a new worker in place of the killed one",
            )
            assert replaced & workers == workers - {victim}
            for i in range(6):  # several connections, so both workers serve
                with connect(server.ws_url + "/echo") as ws:
                    ws.send(f"still serving {i}")
                    assert ws.recv(timeout=10) == f"still serving {i}"
            assert "starting another" in server.output
            server.signal(signal.SIGTERM)
            assert server.wait(timeout=20) == 0
            wait_until(
                lambda: not any(alive(pid) for pid in replaced),
                5,
                message="the workers to exit with the supervisor",
            )
        finally:
            server.stop(timeout=5)


def marked_processes(mark):
    """The live processes whose environment carries ``mark`` (a server and
    every process it forked, wherever they were reparented)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("STARGATE_TEST_MARK") == mark and (
                process.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(process.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def test_a_signal_storm_while_workers_start_leaves_no_worker_behind(runtime):
    # SIGTERM after SIGTERM at a supervisor that is forking its workers: the
    # second one kills the workers it knows and exits. A signal handled
    # between a fork and the parent recording the child left that worker
    # serving on its own (5 runs of 8 before stargate blocked the signals
    # around fork).
    for attempt in range(5):
        mark = f"{os.getpid()}-{runtime}-{attempt}-{time.monotonic_ns()}"
        command = stargate_command(
            "demo", "--port", "0", "--workers", "4", "--runtime", runtime
        )
        server = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "STARGATE_TEST_MARK": mark, "PYTHONUNBUFFERED": "1"},
        )
        try:
            # The demo's line comes just before the workers are forked: the
            # storm must start at once, not at the next poll.
            readable, _, _ = select.select([server.stdout], [], [], 30)
            assert readable, "stargate demo printed nothing in 30 s"
            assert b"stargate demo:" in server.stdout.readline()
            deadline = time.monotonic() + 20
            while server.poll() is None and time.monotonic() < deadline:
                os.kill(server.pid, signal.SIGTERM)
                time.sleep(0.0005)  # pacing the storm, not waiting for it
            server.wait(timeout=10)
            wait_until(
                lambda: not marked_processes(mark),
                10,
                message=f"no worker left after the storm (attempt {attempt})",
            )
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(timeout=5)
            server.stdout.close()
            for pid in marked_processes(mark):
                os.kill(pid, signal.SIGKILL)
