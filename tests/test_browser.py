"""The demo's chat page in a real, headless Chromium: two tabs talk.

The browser runs in a subprocess (this file run as a script): Playwright's
sync API drives its own event loop on greenlets, which does not mix with
the eventlet monkey-patching ``tests/conftest.py`` applies to the test
process.
"""

import pathlib
import subprocess
import sys

import pytest

from tests.browser import ARTIFACTS, launch, require_chromium, run_script

SCREENSHOT = ARTIFACTS / "browser-chat.png"


def chat_in_two_pages(url, screenshot):
    """Open the chat twice, say something in one, see it in the other."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            context = browser.new_context(viewport={"width": 900, "height": 640})
            context.set_default_timeout(15_000)
            alice = context.new_page()
            bob = context.new_page()
            alice.goto(f"{url}/?name=alice&room=browsers")
            bob.goto(f"{url}/?name=bob&room=browsers")
            for page in (alice, bob):
                expect(page.locator("#status")).to_have_text("connected to browsers")
                expect(page.locator("#send")).to_be_enabled()
            # bob listens once his join message came back to him
            expect(bob.locator("#log")).to_contain_text("bob joined")

            alice.fill("#text", "hello from alice")
            alice.click("#send")
            expect(bob.locator("#log")).to_contain_text("alice:hello from alice")
            expect(alice.locator("#log")).to_contain_text("alice:hello from alice")

            bob.fill("#text", "hi alice, bob here")
            bob.press("#text", "Enter")
            expect(alice.locator("#log")).to_contain_text("bob:hi alice, bob here")
            expect(bob.locator("#text")).to_have_value("")

            screenshot.parent.mkdir(parents=True, exist_ok=True)
            alice.screenshot(path=str(screenshot))
        finally:
            browser.close()


def start_demo(port):
    """``stargate demo`` on ``port`` (no monkey-patching here); the process."""
    process = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-m", "stargate", "demo"]
        + ["--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # The server's startup line ("Serving on ...") comes first, then the
    # demo's own URL line once it accepts.
    lines = []
    while len(lines) < 20:
        lines.append(process.stdout.readline())
        if "stargate demo: http://" in lines[-1] or not lines[-1]:
            break
    assert "stargate demo: http://" in lines[-1], "".join(lines)
    return process


def reconnects_after_a_drop(port):
    """The page says the connection dropped, retries, and comes back."""
    from playwright.sync_api import expect, sync_playwright

    server = start_demo(port)
    try:
        with sync_playwright() as playwright:
            browser = launch(playwright)
            try:
                page = browser.new_page()
                page.set_default_timeout(20_000)
                page.goto(f"http://127.0.0.1:{port}/?name=carol&room=drops")
                expect(page.locator("#status")).to_have_text("connected to drops")

                server.kill()  # a drop: no closing handshake at all
                server.wait(timeout=10)
                expect(page.locator("#status")).to_contain_text("reconnecting")
                expect(page.locator("#log")).to_contain_text("connection lost")
                expect(page.locator("#send")).to_be_disabled()

                server = start_demo(port)
                expect(page.locator("#status")).to_have_text("connected to drops")
                page.fill("#text", "back again")
                page.click("#send")
                expect(page.locator("#log")).to_contain_text("carol:back again")
            finally:
                browser.close()
    finally:
        server.kill()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def demo():
    from tests.clients import ServerProcess, stargate_command

    server = ServerProcess(
        stargate_command("demo", "--port", "0", "--log-level", "warning"),
        url_pattern=r"stargate demo: (http://\S+)",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop(timeout=5)


@pytest.mark.timeout(180)
def test_two_pages_chat_through_the_demo(demo):
    require_chromium()
    if SCREENSHOT.exists():
        SCREENSHOT.unlink()
    run_script(__file__, demo.url, SCREENSHOT)
    assert SCREENSHOT.stat().st_size > 0


@pytest.mark.timeout(180)
def test_the_page_reconnects_after_the_server_drops():
    require_chromium()
    from tests.clients import free_port

    run_script(__file__, "reconnect", free_port())


if __name__ == "__main__":
    if sys.argv[1] == "reconnect":
        reconnects_after_a_drop(int(sys.argv[2]))
    else:
        chat_in_two_pages(sys.argv[1], pathlib.Path(sys.argv[2]))
