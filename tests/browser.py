"""Shared by the browser tests: headless Chromium, driven by Playwright.

Each browser test runs its Playwright part as a script in a subprocess
(:func:`run_script`): Playwright's sync API runs its own event loop on
greenlets, which does not mix with the eventlet monkey-patching
``tests/conftest.py`` applies to the test process.
"""

import os
import pathlib
import subprocess
import sys

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = pathlib.Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"


def require_chromium():
    """Skip without Chromium; fail instead under ./.ci/run, which installs it."""
    if os.path.exists(CHROMIUM):
        return
    reason = f"{CHROMIUM} is missing: apt-get install chromium (./.ci/run does)"
    if os.environ.get("STARGATE_REQUIRE_BROWSER"):
        pytest.fail(reason)
    pytest.skip(reason)


def launch(playwright):
    """A headless Chromium that makes no connection but to loopback."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000
    )


def run_script(script, *args, timeout=150):
    """Run a browser test's Playwright part; fail with its output if it fails."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
