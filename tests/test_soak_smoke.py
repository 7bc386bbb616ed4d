"""benchmarks/soak.py --quick: two workers, Redis, clients joining and
leaving for a few seconds; no message lost, no worker lost."""

import json
import os
import subprocess
import sys

import pytest

from stargate.testing.redis_server import RedisServerNotFound, find_redis_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(180)
def test_soak_quick(tmp_path):
    try:
        find_redis_server()
    except RedisServerNotFound as exc:
        pytest.skip(str(exc))
    summary_path = tmp_path / "soak.json"
    plot_path = tmp_path / "soak.png"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "soak.py"),
            "--quick",
            "--json",
            str(summary_path),
            "--plot",
            str(plot_path),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["lost"] == 0
    assert summary["published"] > 50
    assert summary["received"] >= summary["published"] * 30
    assert summary["joins"] > summary["clients"]  # clients came and went
    assert summary["leaves"] > 0
    assert summary["workers_alive"] and summary["dropped_by_server"] == 0
    assert plot_path.stat().st_size > 1000
