"""``config.include('stargate')``: the predicate, the settings, the hub.

Every setting shares the ``stargate.`` prefix, is read once here, coerced to
its type and written back to ``registry.settings``, so the rest of the code
(and yours) reads typed values. :data:`DEFAULTS` documents them all.

In an ``.ini`` file::

    [app:main]
    stargate.backend = redis://127.0.0.1:6379/0
    stargate.allowed_origins = https://example.com https://www.example.com
    stargate.max_message_size = 1048576

In Python::

    config = Configurator(settings={"stargate.backend": "memory"})
    config.include("stargate")

A value that does not parse is refused at start-up with one line naming the
setting, the value and what is allowed (:class:`IncorrectlyConfigured`):
``stargate.compression = flase`` is an error, not ``False``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from pyramid.settings import aslist, falsey, truthy

from stargate.exceptions import IncorrectlyConfigured

__all__ = [
    "Settings",
    "DEFAULTS",
    "parse_settings",
    "get_settings",
    "get_hub",
    "includeme",
    "NoTransactionForWebSockets",
]

log = logging.getLogger("stargate.config")

PREFIX = "stargate."
BACKEND_OPTION_PREFIX = "stargate.backend."


def as_bool(value: object) -> bool:
    """``True`` or ``False`` from a bool or from one of Pyramid's truthy and
    falsey strings; anything else (a typo like ``flase``) is a ValueError,
    where ``pyramid.settings.asbool`` would quietly say ``False``."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in truthy:
        return True
    if word in falsey:
        return False
    raise ValueError("must be true or false (also yes/no, on/off, 1/0)")


def _number(kind: Callable[[Any], Any], value: Any, allowed: str) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be {allowed}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"must be {allowed}")
    return number


def _origins(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    origins: tuple[str, ...] | None
    if isinstance(value, (list, tuple, frozenset, set)):
        origins = tuple(value)
    else:
        origins = tuple(aslist(value)) or None
    if origins:
        # the handshake's own parser: what it accepts here, it accepts later
        from stargate.handshake import normalise_allowed_origins

        try:
            normalise_allowed_origins(origins)
        except IncorrectlyConfigured as exc:
            raise ValueError(str(exc)) from None
    return origins


def _versions(value):
    """``stargate.protocols``: draft names, or the older 13/76/75 aliases."""
    from stargate.handshake import normalise_versions

    try:
        return normalise_versions(value)
    except IncorrectlyConfigured:
        raise IncorrectlyConfigured(
            "stargate.protocols lists the drafts to accept among rfc6455, "
            "hixie-76 and hixie-75 (or their older names 13, 76 and 75); "
            f"got {value!r}"
        ) from None


def _is_off(value):
    return value is None or (
        isinstance(value, str) and value.strip().lower() in ("", "none", "off")
    )


def _optional_seconds(value):
    if _is_off(value):
        return None
    return _positive(float, value, "a positive number of seconds, or 'off'")


def as_seconds(value: object) -> float:
    """A positive, finite number of seconds, or ValueError saying so."""
    return _positive(float, value, "a positive number of seconds")


def _positive(kind: Callable[[Any], Any], value: Any, allowed: str) -> Any:
    number = _number(kind, value, allowed)
    if not number > 0:
        raise ValueError(f"must be {allowed}")
    return number


def _optional_size(value):
    if _is_off(value):
        return None
    return _positive(int, value, "a positive number of bytes, or 'off'")


def _size(value):
    return _positive(int, value, "a positive whole number of bytes")


def _count(value):
    allowed = "0 (no limit) or a positive whole number"
    count = _number(int, value, allowed)
    if count < 0:
        raise ValueError(f"must be {allowed}")
    return count


def _slow_listener(value):
    if value not in ("close", "drop"):
        raise ValueError("must be 'close' or 'drop'")
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``stargate.*`` settings, typed. Each field's comment gives its unit."""

    #: ``memory``, ``redis://host:port/db``, ``rediss://...``, ``unix://...``,
    #: ``redis+cluster://host:port`` or the dotted name of a Backend class.
    backend: str = "memory"
    #: Origins allowed to connect (``scheme://host[:port]``), ``*`` for any;
    #: unset means same-origin browsers and clients that send no Origin.
    allowed_origins: tuple | None = None
    #: Drafts accepted: rfc6455, hixie-76 and hixie-75 (their older names
    #: 13, 76 and 75 are aliases). All three by default, so the 2010 clients
    #: stargate served still work (no current browser speaks the drafts, so
    #: a page cannot use them for the proxy cache-poisoning attack that
    #: retired them); set ``rfc6455`` where no such client exists.
    protocols: tuple = ("rfc6455", "hixie-76", "hixie-75")
    #: Offer permessage-deflate (RFC 7692) to clients that ask for it.
    compression: bool = True
    #: Largest message accepted, in bytes (after decompression); 1009 past it.
    max_message_size: int | None = 2**20
    #: Seconds between keepalive pings on a quiet connection; off to disable.
    ping_interval: float | None = 20.0
    #: Seconds to wait for an answer to a ping before dropping the connection.
    ping_timeout: float = 20.0
    #: Seconds without a message (text or binary) from the client before the
    #: connection is closed with 1001 "idle timeout"; pings and pongs do not
    #: count as activity. Off by default: keepalive pings already find dead
    #: peers; this closes live but silent ones.
    idle_timeout: float | None = None
    #: Seconds to wait for the peer's close frame when closing.
    close_timeout: float = 10.0
    #: Seconds a client has to send the rest of the handshake.
    handshake_timeout: float = 10.0
    #: Bytes that may wait to be sent to one listener before it counts as slow.
    max_send_buffer: int = 2**20
    #: What happens to a slow listener: ``close`` (1013) or ``drop`` messages.
    slow_listener: str = "close"
    #: Open WebSockets per worker process; more get 503. 0 means no limit.
    max_connections: int = 0
    #: Messages of history kept per channel, so listeners can resume from a
    #: position; 0 (the default) keeps none. Resources override it with a
    #: ``history_size`` class attribute.
    history_size: int = 0
    #: Seconds a channel's history is kept after its last message.
    history_ttl: float = 3600.0
    #: Run blocking handlers in a green thread of their own (on stargate's
    #: server), where the request's ends at the upgrade: about half the
    #: memory per parked connection. Views override it with their
    #: ``own_green_thread`` attribute.
    own_green_thread: bool = False
    #: Keyword options for the backend, from ``stargate.backend.<name>``.
    backend_options: dict = dataclasses.field(default_factory=dict)

    def connection_options(self):
        """Keyword arguments for :class:`stargate.connection.WebSocket`."""
        return {
            "ping_interval": self.ping_interval,
            "ping_timeout": self.ping_timeout,
            "idle_timeout": self.idle_timeout,
            "close_timeout": self.close_timeout,
            "max_send_buffer": self.max_send_buffer,
            "slow_listener": self.slow_listener,
        }


DEFAULTS = Settings()

_COERCE: dict[str, Callable[[Any], Any]] = {
    "backend": str,
    "allowed_origins": _origins,
    "protocols": _versions,
    "compression": as_bool,
    "max_message_size": _optional_size,
    "ping_interval": _optional_seconds,
    "ping_timeout": as_seconds,
    "idle_timeout": _optional_seconds,
    "close_timeout": as_seconds,
    "handshake_timeout": as_seconds,
    "max_send_buffer": _size,
    "slow_listener": _slow_listener,
    "max_connections": _count,
    "history_size": _count,
    "history_ttl": as_seconds,
    "own_green_thread": as_bool,
}


def parse_settings(settings: Mapping[str, Any] | None) -> Settings:
    """Read the ``stargate.*`` keys of ``settings`` into a :class:`Settings`.

    Raises :class:`~stargate.exceptions.IncorrectlyConfigured` naming the
    setting and the value for anything that does not parse.
    """
    values = {}
    backend_options = {}
    for key, raw in (settings or {}).items():
        if not key.startswith(PREFIX):
            continue
        if key.startswith(BACKEND_OPTION_PREFIX):
            backend_options[key[len(BACKEND_OPTION_PREFIX) :]] = raw
            continue
        name = key[len(PREFIX) :]
        if name not in _COERCE:
            known = ", ".join(PREFIX + n for n in sorted(_COERCE))
            raise IncorrectlyConfigured(
                f"unknown setting {key!r}; stargate knows {known}"
            )
        try:
            values[name] = _COERCE[name](raw)
        except IncorrectlyConfigured:
            raise
        except (TypeError, ValueError) as exc:
            raise IncorrectlyConfigured(f"setting {key} = {raw!r}: {exc}") from None
    if "backend" in values:
        _check_backend_url(values["backend"])
    return Settings(backend_options=backend_options, **values)


#: URL schemes whose host part is ``host[:port]`` with a numeric port.
_HOST_PORT_SCHEMES = {
    "redis",
    "rediss",
    "redis+cluster",
    "rediss+cluster",
    "redis+streams",
    "rediss+streams",
}


def _check_backend_url(value: str) -> None:
    """Refuse a Redis URL whose port or database is not a number now, rather
    than at the first join ("Port could not be cast to integer value")."""
    scheme, sep, _ = value.strip().partition("://")
    if not sep or scheme.lower() not in _HOST_PORT_SCHEMES:
        return
    parts = urllib.parse.urlsplit(value.strip())
    shown = redacted_backend(value)
    try:
        parts.port
    except ValueError:
        port = parts.netloc.rpartition("@")[2].rpartition(":")[2]
        raise IncorrectlyConfigured(
            f"setting stargate.backend = {shown!r}: port {port!r} is not a "
            f"port number; use {scheme}://host:port/db with a port 1-65535"
        ) from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise IncorrectlyConfigured(
            f"setting stargate.backend = {shown!r}: database {db!r} is not a "
            f"number; use {scheme}://host:port/db with db 0, 1, ..."
        )


def redacted_backend(value: object) -> str:
    """A ``stargate.backend`` value fit for a log line: a URL's password is
    replaced with ``***``."""
    value = str(value)
    if "://" not in value:
        return value
    from stargate.backends.redis import redact_url

    return redact_url(value)


def get_settings(registry: Any = None) -> Settings:
    """The :class:`Settings` of ``registry`` (the current one by default),
    or the defaults when ``config.include('stargate')`` was not called."""
    if registry is None:
        from pyramid.threadlocal import get_current_registry

        registry = get_current_registry()
    return getattr(registry, "stargate_settings", None) or DEFAULTS


def get_hub(registry: Any = None) -> Any:
    """The :class:`~stargate.hub.Hub` of ``registry`` (the current one by
    default): the one ``config.include('stargate')`` stored on it as
    ``registry.stargate_hub``, or else :func:`stargate.hub.default_hub`.

    It lives here, beside :func:`get_settings`, because finding the running
    application is configuration's business; the hub only fans out.
    """
    if registry is None:
        from pyramid.threadlocal import get_current_registry

        registry = get_current_registry()
    hub = getattr(registry, "stargate_hub", None)
    if hub is not None:
        return hub
    from stargate.hub import default_hub

    return default_hub()


class NoTransactionForWebSockets:
    """A ``tm.activate_hook`` for ``pyramid_tm``: no transaction is begun for
    a WebSocket upgrade request, since its handler runs inside the view for
    the whole life of the connection and would hold the transaction (and its
    database connection) open all that time. Other requests are decided by
    the application's own hook, ``wrapped`` (a callable or a dotted name),
    or get a transaction when there is none.

    A handler that does transactional work opens a short transaction per
    unit of work: ``with self.request.tm:`` (see :doc:`/howto/transactions`).
    """

    def __init__(self, wrapped: Any = None) -> None:
        if isinstance(wrapped, str):
            from pyramid.path import DottedNameResolver

            wrapped = DottedNameResolver().maybe_resolve(wrapped)
        self.wrapped = wrapped

    def __call__(self, request: Any) -> bool:
        from stargate.predicates import is_websocket

        if is_websocket(None, request):
            return False
        return True if self.wrapped is None else bool(self.wrapped(request))


def _no_transaction_for_websockets(settings: dict[str, Any]) -> None:
    """Install :class:`NoTransactionForWebSockets` as ``tm.activate_hook``,
    around the application's own hook if it has one. pyramid_tm reads the
    setting when the WSGI app is made, so the order of includes does not
    matter; a hook set with ``add_settings`` after this replaces it."""
    hook = settings.get("tm.activate_hook")
    if not isinstance(hook, NoTransactionForWebSockets):
        settings["tm.activate_hook"] = NoTransactionForWebSockets(hook or None)


def includeme(config: Any) -> None:
    """Set stargate up in a Pyramid application.

    Registers the ``websocket`` view predicate, reads the settings and
    creates this process's hub with the configured backend.
    """
    from stargate import predicates
    from stargate.backends import load_backend
    from stargate.backends.base import keeps_history
    from stargate.hub import Hub

    predicates.includeme(config)
    settings = parse_settings(config.get_settings())
    written = config.registry.settings
    for field in dataclasses.fields(Settings):
        if field.name != "backend_options":
            written[PREFIX + field.name] = getattr(settings, field.name)
    config.registry.stargate_settings = settings
    backend = load_backend(settings.backend, **settings.backend_options)
    if settings.history_size and not keeps_history(backend):
        raise IncorrectlyConfigured(
            f"stargate.history_size = {settings.history_size} needs a backend "
            f"that keeps history, and {settings.backend!r} does not; use memory "
            "or redis+streams://host:port/db, or set stargate.history_size = 0"
        )
    config.registry.stargate_hub = Hub(backend)
    _no_transaction_for_websockets(written)
    log.debug("stargate configured: %s", settings)
