"""The demo pages in a real, headless Chromium, as a visitor uses them: no
console error, the chat's WebSocket, the jobs example's buttons, the echo
page at /echo (served by ``stargate demo`` and by ``gunicorn -k gevent``),
and a reconnect that backs off when a server accepts and closes at once.

The browser runs in a subprocess (this file run as a script), as in
``tests/test_browser.py``; so does the server that closes every connection.
"""

import sys

import pytest

from tests.browser import launch, require_chromium, run_script


def demo_pages(url):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            errors = []
            page.on(
                "console",
                lambda msg: msg.type == "error" and errors.append(msg.text),
            )
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            page.goto(f"{url}/?name=dora&room=pages")
            expect(page.locator("#status")).to_have_text("connected to pages")
            page.fill("#job-id", "7")
            page.click("#job-start")
            expect(page.locator("#job-state")).to_have_text("running")
            page.click("#job-stop")
            expect(page.locator("#job-state")).to_have_text("stopped")
            expect(page.locator("#log")).to_contain_text("job 7 is stopped")

            page.goto(f"{url}/echo")
            expect(page.locator("#log")).to_contain_text("open")
            page.fill("#text", "echo me")
            page.click("button")
            expect(page.locator("#log")).to_contain_text("< echo me")
            page.goto("about:blank")  # closes the echo socket cleanly
            assert errors == [], errors
        finally:
            browser.close()


def backs_off(url):
    """The server accepts and closes each connection at once: the attempt
    count must grow (it stayed at 1 when an open reset it)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{url}/?name=erin&room=flaky")
            expect(page.locator("#status")).to_have_text("reconnecting (attempt 3)")
            log = page.locator("#log").inner_text()
            delays = [
                float(line.split("reconnecting in ")[1].split(" s")[0])
                for line in log.splitlines()
                if "reconnecting in" in line
            ]
            assert delays[1] > delays[0], delays  # 0.5 s, then about 1 s
        finally:
            browser.close()


def serve_closing(port):
    """The chat page, and rooms that accept a WebSocket and close it."""
    import eventlet

    eventlet.monkey_patch()
    from pyramid.config import Configurator

    from stargate import WebSocketView
    from stargate.demo import chat_page
    from stargate.factory import serve

    class Closing(WebSocketView):
        def handler(self, websocket):
            websocket.close(1011, "closing at once")

    with Configurator() as config:
        config.include("stargate")
        config.add_route("chat", "/")
        config.add_view(chat_page, route_name="chat")
        config.add_route("room", "/rooms/{name}")
        config.add_view(Closing, route_name="room")
        app = config.make_wsgi_app()
    serve(app, "127.0.0.1", port)


def stargate_demo():
    from tests.clients import ServerProcess, stargate_command

    command = stargate_command("demo", "--port", "0", "--log-level", "warning")
    server = ServerProcess(command, url_pattern=r"stargate demo: (http://\S+)")
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def gunicorn_gevent():
    """The demo as docs/howto/gunicorn.rst serves it with gevent."""
    from tests.test_gunicorn import gunicorn_server

    return gunicorn_server(
        "-k", "gevent", "-c", "python:stargate.gunicorn", "stargate.demo:make_app()"
    )


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "serve", [stargate_demo, gunicorn_gevent], ids=lambda f: f.__name__
)
def test_demo_pages_without_console_errors(serve):
    require_chromium()
    with serve() as demo:
        run_script(__file__, "pages", demo.url)


@pytest.mark.timeout(180)
def test_the_page_backs_off_when_every_connection_is_closed_at_once():
    require_chromium()
    from tests.clients import ServerProcess, free_port

    port = free_port()
    command = [sys.executable, "-W", "ignore", __file__, "serve-closing", str(port)]
    with ServerProcess(command, port=port, env=_pythonpath()) as server:
        server.wait_ready()
        run_script(__file__, "backoff", server.url)


def _pythonpath():
    import os

    from tests.browser import ROOT

    return dict(os.environ, PYTHONPATH=str(ROOT))


if __name__ == "__main__":
    if sys.argv[1] == "pages":
        demo_pages(sys.argv[2])
    elif sys.argv[1] == "backoff":
        backs_off(sys.argv[2])
    elif sys.argv[1] == "serve-closing":
        serve_closing(int(sys.argv[2]))
