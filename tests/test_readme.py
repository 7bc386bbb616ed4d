"""The README's statements hold: its commands run as written (with a free
port instead of 8080 and a private Redis instead of 6379), and its Python
example serves a chat two clients use.

``pip install -e .`` and ``./.ci/run`` are what ``.ci/run`` itself does;
``python -m sphinx`` is run by tests/test_docs.py, the benchmark commands
by tests/test_benchmarks_smoke.py and tests/test_soak_smoke.py.
"""

import os
import pathlib
import re
import shlex
import sys

import pytest

from tests.clients import ServerProcess, connect, free_port, http

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BIN = pathlib.Path(sys.executable).parent


def command_in_readme(prefix):
    """The README command starting with ``prefix`` (in a code block or in
    backticks), as arguments."""
    for line in re.findall(r"`([^`\n]+)`", README) + README.splitlines():
        line = line.split("#")[0].split("&&")[-1].strip()
        if line.startswith(prefix):
            return shlex.split(line)
    raise AssertionError(f"the README has no command starting with {prefix!r}")


def with_port(args, port):
    return [str(port) if arg == "8080" else arg for arg in args]


def test_stargate_demo_as_written(tmp_path):
    args = command_in_readme("stargate demo --port 8080")
    port = free_port()
    command = [str(BIN / "stargate"), *with_port(args, port)[1:]]
    with ServerProcess(command, url_pattern=r"stargate demo: (http://\S+)") as demo:
        assert demo.wait_ready() == f"http://127.0.0.1:{port}"
        assert http(demo.url + "/").status == 200


def test_pserve_development_ini_as_written():
    args = command_in_readme("pserve stargate/demo/development.ini")
    port = free_port()
    args = [arg.replace("8080", str(port)) for arg in args]
    command = [sys.executable, "-W", "ignore", "-m", "pyramid.scripts.pserve"]
    with ServerProcess(command + args[1:], port=port, cwd=ROOT) as server:
        server.wait_ready()
        assert http(server.url + "/").status == 200


def test_stargate_demo_with_workers_and_redis(stargate_redis):
    args = command_in_readme("stargate demo --workers 4")
    assert "redis://127.0.0.1:6379/0" in args  # the README's; ours is private
    args = [stargate_redis.url if a.startswith("redis://") else a for a in args]
    command = [str(BIN / "stargate"), *args[1:], "--port", "0"]
    with ServerProcess(command, url_pattern=r"stargate demo: (http://\S+)") as demo:
        demo.wait_ready()
        with connect(demo.ws_url + "/echo") as ws:
            ws.send("four workers")
            assert ws.recv(timeout=10) == "four workers"


def test_the_usage_example_serves_a_chat(tmp_path):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    port = free_port()
    assert 'serve(app, "127.0.0.1", 8080)' in code
    script = tmp_path / "readme_app.py"
    script.write_text(code.replace("8080", str(port)), encoding="utf-8")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with ServerProcess([sys.executable, str(script)], port=port, env=env) as server:
        server.wait_ready()
        url = f"ws://127.0.0.1:{port}/rooms/readme"
        with connect(url) as alice, connect(url) as bob:
            alice.send("hello from the README")
            assert alice.recv(timeout=10) == "hello from the README"
            assert bob.recv(timeout=10) == "hello from the README"


@pytest.mark.parametrize("path", ["docs/reference/settings.rst", "LICENSE"])
def test_files_the_readme_names_exist(path):
    assert path in README
    assert (ROOT / path).exists()
