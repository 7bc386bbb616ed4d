"""What the tests take from the process's green-thread library.

The suite runs on eventlet or on gevent (``--runtime``, see
``tests/conftest.py``): a test sleeps, spawns, waits and times out through
this module, never through eventlet or gevent, so it runs on both.
"""

from stargate import runtime

_runtime = runtime.current()

sleep = _runtime.sleep
spawn = _runtime.spawn
kill = _runtime.kill
getcurrent = _runtime.getcurrent
#: ``with Timeout(seconds):`` raises there after ``seconds``;
#: ``Timeout(seconds, False)`` leaves the block silently;
#: ``Timeout(seconds, exc)`` raises ``exc``.
Timeout = _runtime.Timeout
Event = _runtime.Event


#: What a thread made by :func:`spawn` returned, once it ends (or raise what
#: it raised).
wait = _runtime.join


def run_all(*calls):
    """Run each ``(function, *args)`` in a green thread of its own, all at
    once, and return their results in order once every one has ended (the
    first exception is raised, after all have ended)."""
    threads = [spawn(function, *args) for function, *args in calls]
    results, error = [], None
    for thread in threads:
        try:
            results.append(wait(thread))
        except Exception as exc:  # every thread is waited for
            error = error or exc
            results.append(None)
    if error is not None:
        raise error
    return results
