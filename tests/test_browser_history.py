"""The chat page recovers what it missed, in a real headless Chromium.

The server (tests/history_worker.py, mode ``demo``) is the demo on the
memory backend plus a test hook that closes one page's WebSocket from the
server side and holds its reconnection back for a moment. Another page sends
messages meanwhile; after the automatic reconnect the first page shows every
one of them, once. The browser runs in a subprocess (this file as a script):
Playwright's sync API does not mix with eventlet's monkey-patching.
"""

import os
import pathlib
import sys
import urllib.request

import pytest

from tests.browser import ARTIFACTS, ROOT, launch, require_chromium, run_script

SCREENSHOT = ARTIFACTS / "browser-history.png"
MISSED = [f"missed {i}" for i in range(5)]


def lines(page):
    return page.locator("#log li").all_inner_texts()


def recover_in_the_browser(url, screenshot):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            context = browser.new_context(viewport={"width": 900, "height": 640})
            context.set_default_timeout(15_000)
            alice = context.new_page()
            bob = context.new_page()
            alice.goto(f"{url}/?name=alice&room=recover")
            expect(alice.locator("#status")).to_have_text("connected to recover")
            bob.goto(f"{url}/?name=bob&room=recover")
            expect(bob.locator("#status")).to_have_text("connected to recover")
            expect(alice.locator("#log")).to_contain_text("bob joined")

            bob.fill("#text", "before")
            bob.press("#text", "Enter")
            expect(alice.locator("#log")).to_contain_text("bob:before")

            # The server closes alice's WebSocket and refuses her for 2 s.
            kick = f"{url}/_test/kick?room=recover&name=alice&hold=2"
            with urllib.request.urlopen(kick, timeout=10) as response:
                assert response.read() == b"1"
            expect(alice.locator("#log")).to_contain_text("connection lost")
            expect(alice.locator("#status")).not_to_have_text("connected to recover")

            for text in MISSED:
                bob.fill("#text", text)
                bob.press("#text", "Enter")
                expect(bob.locator("#log")).to_contain_text(f"bob:{text}")
            # alice was away for all of it
            assert not any("missed" in line for line in lines(alice))

            expect(alice.locator("#status")).to_have_text(
                "connected to recover", timeout=30_000
            )
            expect(alice.locator("#log")).to_contain_text("catching up after message")
            expect(alice.locator("#log")).to_contain_text(f"bob:{MISSED[-1]}")
            bob.fill("#text", "live again")
            bob.press("#text", "Enter")
            expect(alice.locator("#log")).to_contain_text("bob:live again")

            shown = lines(alice)
            for text in ["before", *MISSED, "live again"]:
                count = sum(1 for line in shown if line.endswith(f"bob:{text}"))
                assert count == 1, f"{text!r} shown {count} times: {shown}"
            order = [line for line in shown if "bob:" in line]
            assert [line.split("bob:", 1)[1] for line in order] == [
                "before",
                *MISSED,
                "live again",
            ]
            assert not any("could not recover" in line for line in shown)

            screenshot.parent.mkdir(parents=True, exist_ok=True)
            alice.screenshot(path=str(screenshot))
        finally:
            browser.close()


@pytest.fixture(scope="module")
def demo():
    from tests.clients import ServerProcess

    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    server = ServerProcess(
        [sys.executable, str(ROOT / "tests" / "history_worker.py"), "demo"],
        url_pattern=r"history demo: (http://\S+)",
        env=env,
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(180)
def test_the_chat_page_gets_what_it_missed_once(demo):
    require_chromium()
    if SCREENSHOT.exists():
        SCREENSHOT.unlink()
    run_script(__file__, demo.url, SCREENSHOT)
    assert SCREENSHOT.stat().st_size > 0


if __name__ == "__main__":
    recover_in_the_browser(sys.argv[1], pathlib.Path(sys.argv[2]))
