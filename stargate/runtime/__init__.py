"""The runtime seam: what stargate takes from a green-thread library.

The protocol core (handshake, frames, protocol, deflate) does no I/O. The
driver, the hub, the backends and the testing helpers need a few things from
the green-thread library the server runs on: spawning, sleeping, events,
locks, timeouts, a hub callback when a socket becomes readable, timers. Each
runtime provides them in one module of this package, with the same names:

* :mod:`stargate.runtime.eventlet`, the default (the seed ran on eventlet);
* :mod:`stargate.runtime.gevent`, for gevent's servers and
  ``gunicorn -k gevent``.

No other stargate module imports eventlet or gevent (only the servers built
on one: :mod:`stargate.servers.eventlet` on eventlet's,
:mod:`stargate.servers.gevent` on gevent's). :func:`current` tells which
runtime this process runs: the one named by :func:`use` or
``STARGATE_RUNTIME``, else the library that monkey-patched the standard
library, else eventlet. A process runs one
runtime: both patch ``socket`` and ``threading``.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

__all__ = ["RUNTIMES", "current", "use", "detect", "RUNTIME_ENV"]

#: The runtimes stargate runs on.
RUNTIMES = ("eventlet", "gevent")

#: The environment variable that names the runtime where nothing else tells.
RUNTIME_ENV = "STARGATE_RUNTIME"

_current: ModuleType | None = None


def _check(name: str, source: str) -> str:
    if name not in RUNTIMES:
        raise ValueError(
            f"{source} is {name!r}: stargate runs on " + " or ".join(RUNTIMES)
        )
    return name


def detect() -> str:
    """The runtime this process should use, without choosing it.

    ``STARGATE_RUNTIME`` when set; else ``"gevent"`` when gevent has patched
    ``socket``; else ``"eventlet"``.
    """
    named = os.environ.get(RUNTIME_ENV)
    if named:
        return _check(named.strip().lower(), RUNTIME_ENV)
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("socket"):
        return "gevent"
    return "eventlet"


def use(name: str) -> ModuleType:
    """Make ``name`` this process's runtime and return its module.

    Servers call it before they monkey-patch. Raises ``ValueError`` for an
    unknown name, and ``RuntimeError`` if another runtime is in use already.
    """
    global _current
    _check(name, "the runtime")
    if _current is not None:
        if _current.NAME != name:
            raise RuntimeError(
                f"this process runs stargate on {_current.NAME}; it cannot "
                f"switch to {name} (both patch the standard library)"
            )
        return _current
    _current = importlib.import_module(f"stargate.runtime.{name}")
    return _current


def current() -> ModuleType:
    """The runtime module of this process (chosen on first use)."""
    runtime = _current
    if runtime is None:
        runtime = use(detect())
    return runtime
