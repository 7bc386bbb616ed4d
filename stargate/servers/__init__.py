"""stargate's own WSGI servers, one module per runtime.

:mod:`stargate.servers.eventlet` is built on ``eventlet.wsgi``,
:mod:`stargate.servers.gevent` on ``gevent.pywsgi``. Each gives the view the
same environ keys (:mod:`stargate.environ_keys`), writes the same access log
and runs one worker process. What does not depend on the runtime (options,
workers and their supervision, trusted proxies, the startup line, the error
page) lives in :mod:`stargate.factory`, whose :func:`~stargate.factory.
server_factory` and :func:`~stargate.factory.serve` pick one of them.

Every module here provides ``listen(host, port)``, ``run_worker(app, sock,
**options)`` and ``after_fork()`` for :func:`~stargate.factory.serve`, and
``serve_in_background(sock, app, request_timeout=...)`` and
``serve_connection(app, sock, address)`` for the testing helpers
(:class:`~stargate.testing.server.LiveServer`,
:func:`~stargate.testing.client.connect_app`).
"""
