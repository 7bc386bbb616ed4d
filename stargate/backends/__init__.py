"""Broadcast backends and :func:`load_backend`, which picks one from a setting.

The ``stargate.backend`` setting accepts:

``memory`` (the default)
    :class:`~stargate.backends.memory.MemoryBackend`: one process only.
``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://``, ``rediss+cluster://``
    :class:`stargate.backends.redis.RedisBackend`, imported only when asked
    for, so the ``redis`` package is needed only by those who use it.
``redis+streams://...``, ``rediss+streams://...``
    :class:`stargate.backends.redis_streams.RedisStreamsBackend`: Redis
    Streams, with message history and recovery after a disconnection.
``package.module:Class`` or ``package.module.Class``
    a class of your own that subclasses :class:`~stargate.backends.base.Backend`.
"""

import importlib

from stargate.backends.base import Backend
from stargate.exceptions import IncorrectlyConfigured

__all__ = ["Backend", "load_backend", "REDIS_SCHEMES", "STREAMS_SCHEMES"]

#: URL schemes of the Redis backend (its ``schemes`` attribute is this).
REDIS_SCHEMES = (
    "redis://",
    "rediss://",
    "unix://",
    "redis+cluster://",
    "rediss+cluster://",
)
#: URL schemes of the Redis Streams backend (its ``schemes`` attribute).
STREAMS_SCHEMES = ("redis+streams://", "rediss+streams://")

#: The built-in backends that take URLs, imported only when one is asked for.
_URL_BACKENDS = (
    (REDIS_SCHEMES, "stargate.backends.redis", "RedisBackend"),
    (STREAMS_SCHEMES, "stargate.backends.redis_streams", "RedisStreamsBackend"),
)

_ACCEPTED = (
    f"'memory', a {', '.join(REDIS_SCHEMES + STREAMS_SCHEMES)} URL, "
    "or the dotted name of a Backend subclass (package.module:Class)"
)


def load_backend(setting="memory", **options):
    """Build the backend a ``stargate.backend`` setting names.

    ``options`` are passed to the backend's constructor as keyword arguments.
    A value that is a backend instance already is returned unchanged. Raises
    :class:`~stargate.exceptions.IncorrectlyConfigured` with a sentence for
    a value that names no backend.
    """
    if isinstance(setting, Backend):
        return setting
    if isinstance(setting, type) and issubclass(setting, Backend):
        return setting(**options)
    if setting is None:
        setting = "memory"
    if not isinstance(setting, str):
        raise IncorrectlyConfigured(
            f"stargate.backend must be a string, not {type(setting).__name__}; "
            f"use {_ACCEPTED}."
        )
    value = setting.strip()
    if value == "" or value.lower() == "memory":
        from stargate.backends.memory import MemoryBackend

        return MemoryBackend(**options)
    for schemes, module_name, class_name in _URL_BACKENDS:
        if value.lower().startswith(schemes):
            module = importlib.import_module(module_name)
            return getattr(module, class_name)(value, **options)
    if "://" in value:
        raise IncorrectlyConfigured(
            f"stargate.backend = {setting!r}: unknown URL scheme; use {_ACCEPTED}."
        )
    cls = _import_dotted(value, setting)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise IncorrectlyConfigured(
            f"stargate.backend = {setting!r} names {cls!r}, which is not a "
            "subclass of stargate.backends.base.Backend."
        )
    return cls(**options)


def _import_dotted(value, setting):
    if ":" in value:
        module_name, _, attr_path = value.partition(":")
    else:
        module_name, _, attr_path = value.rpartition(".")
    if not module_name or not attr_path:
        raise IncorrectlyConfigured(
            f"stargate.backend = {setting!r} is not a backend; use {_ACCEPTED}."
        )
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise IncorrectlyConfigured(
            f"stargate.backend = {setting!r}: cannot import {module_name!r} "
            f"({exc}); use {_ACCEPTED}."
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise IncorrectlyConfigured(
                f"stargate.backend = {setting!r}: {module_name!r} has no "
                f"attribute {attr_path!r}; use {_ACCEPTED}."
            ) from None
    return obj
