"""Two headless Chromium pages on two different stargate processes chat.

Each page loads the demo's chat from its own ``stargate demo`` server (one
worker each, different ports) and both servers share one private Redis, so
a message typed in one page crosses processes through Redis to the other.
Two single-worker servers make "a different worker" deterministic, where
the kernel would pick the worker of a multi-worker server.

The browser runs in a subprocess (this file run as a script): Playwright's
sync API drives its own event loop on greenlets, which does not mix with
the eventlet monkey-patching ``tests/conftest.py`` applies to the test
process.
"""

import pathlib
import sys

import pytest

from tests.browser import ARTIFACTS, launch, require_chromium, run_script


def chat_across_servers(alice_url, bob_url, room, artifacts):
    """Alice on one server, Bob on the other: each sees what the other says."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            context = browser.new_context(viewport={"width": 900, "height": 640})
            context.set_default_timeout(15_000)
            alice = context.new_page()
            bob = context.new_page()
            # Alice listens once her own join came back through Redis; only
            # then does Bob come, so she must hear of him from the other server.
            alice.goto(f"{alice_url}/?name=alice&room={room}")
            expect(alice.locator("#status")).to_have_text(f"connected to {room}")
            expect(alice.locator("#log")).to_contain_text("alice joined")
            bob.goto(f"{bob_url}/?name=bob&room={room}")
            expect(bob.locator("#status")).to_have_text(f"connected to {room}")
            expect(bob.locator("#log")).to_contain_text("bob joined")
            expect(alice.locator("#log")).to_contain_text("bob joined")
            for page in (alice, bob):
                expect(page.locator("#send")).to_be_enabled()

            alice.fill("#text", "hello from the first server")
            alice.click("#send")
            expect(bob.locator("#log")).to_contain_text(
                "alice:hello from the first server"
            )
            expect(alice.locator("#log")).to_contain_text(
                "alice:hello from the first server"
            )

            bob.fill("#text", "and hello from the second")
            bob.press("#text", "Enter")
            expect(alice.locator("#log")).to_contain_text(
                "bob:and hello from the second"
            )
            expect(bob.locator("#log")).to_contain_text("bob:and hello from the second")

            artifacts.mkdir(parents=True, exist_ok=True)
            alice.screenshot(path=str(artifacts / "browser-multiworker-alice.png"))
            bob.screenshot(path=str(artifacts / "browser-multiworker-bob.png"))
        finally:
            browser.close()


@pytest.mark.timeout(180)
def test_two_pages_on_two_servers_chat_through_redis(redis_server):
    require_chromium()
    from tests.test_multiworker import demo_servers, unique_room

    screenshots = [
        ARTIFACTS / "browser-multiworker-alice.png",
        ARTIFACTS / "browser-multiworker-bob.png",
    ]
    for path in screenshots:
        if path.exists():
            path.unlink()
    room = unique_room("browsers").rpartition("/")[2]
    first, second = demo_servers(redis_server.url, 2)
    with first, second:
        assert first.url != second.url
        run_script(__file__, first.url, second.url, room, ARTIFACTS)
    for path in screenshots:
        assert path.stat().st_size > 0


if __name__ == "__main__":
    alice_url, bob_url, room, artifacts = sys.argv[1:5]
    chat_across_servers(alice_url, bob_url, room, pathlib.Path(artifacts))
