"""Parsers for backend options, shared by every backend.

A backend option arrives as a keyword argument or as a
``stargate.backend.<name>`` setting (a string from an ``.ini`` file); each
parser takes either, returns the value in its Python type and raises
:class:`~stargate.exceptions.IncorrectlyConfigured` with a sentence naming
the setting for anything else.
"""

from typing import Any

from stargate.exceptions import IncorrectlyConfigured

__all__ = ["as_bool", "backoff_pair", "positive_float", "positive_int"]


def positive_float(name: str, value: Any) -> float:
    """``value`` as a number of seconds greater than 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        raise IncorrectlyConfigured(
            f"stargate.backend.{name} must be a positive number of seconds, "
            f"not {value!r}"
        )
    return number


def positive_int(name: str, value: Any) -> int:
    """``value`` as a whole number greater than 0 (a bool is refused)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number <= 0:
        raise IncorrectlyConfigured(
            f"stargate.backend.{name} must be a positive whole number, not {value!r}"
        )
    return number


def backoff_pair(value: Any) -> "tuple[float, float]":
    """``reconnect_backoff``: the first delay and the longest one, in
    seconds, as a pair or a string (``'0.1 10'`` or ``'0.1, 10'``)."""
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    try:
        initial, maximum = value
    except (TypeError, ValueError):
        raise IncorrectlyConfigured(
            "stargate.backend.reconnect_backoff must be two numbers of seconds, the "
            f"first delay and the longest one (e.g. '0.1 10'), not {value!r}"
        ) from None
    initial = positive_float("reconnect_backoff", initial)
    maximum = positive_float("reconnect_backoff", maximum)
    if maximum < initial:
        raise IncorrectlyConfigured(
            "stargate.backend.reconnect_backoff: the longest delay must not be shorter "
            f"than the first one, got {value!r}"
        )
    return initial, maximum


def as_bool(value: Any) -> bool:
    """A flag: ``'1'``, ``'true'``, ``'yes'`` and ``'on'`` (any case) are
    true in a setting string; any other value is taken for its truth."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
