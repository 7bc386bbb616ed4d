"""The in-memory backend, and :func:`stargate.backends.load_backend`."""

import eventlet
import pytest

from stargate.backends import load_backend
from stargate.backends.base import Backend
from stargate.backends.memory import MemoryBackend
from stargate.exceptions import BackendUnavailable, IncorrectlyConfigured
from tests.backends.contract import BackendContract


class TestMemoryBackendContract(BackendContract):
    backends = ["memory"]
    shared = False


class TestMemoryBackend:
    def test_is_synchronous(self):
        assert MemoryBackend.synchronous is True

    def test_publish_delivers_in_the_callers_green_thread(self):
        backend = MemoryBackend()
        seen = []
        backend.start(
            lambda channel, message: seen.append(
                (channel, message, eventlet.getcurrent())
            )
        )
        backend.subscribe("c")
        backend.publish("c", "now")
        assert seen == [("c", "now", eventlet.getcurrent())]

    def test_only_subscribed_channels_are_delivered(self):
        backend = MemoryBackend()
        seen = []
        backend.start(lambda channel, message: seen.append(channel))
        backend.publish("c", "before")
        backend.subscribe("c")
        backend.publish("c", "during")
        backend.unsubscribe("c")
        backend.unsubscribe("c")  # twice is fine
        backend.publish("c", "after")
        assert seen == ["c"]

    def test_publish_after_close_raises_backend_unavailable(self):
        backend = MemoryBackend()
        backend.start(lambda channel, message: None)
        backend.close()
        with pytest.raises(BackendUnavailable):
            backend.publish("c", "late")

    def test_listener_count_is_the_local_count(self):
        assert MemoryBackend().listener_count("c", 7) == 7


class CustomBackend(Backend):
    def start(self, deliver):
        pass

    def subscribe(self, channel):
        pass

    def unsubscribe(self, channel):
        pass

    def publish(self, channel, message):
        pass


class NotABackend:
    pass


class TestLoadBackend:
    @pytest.mark.parametrize("setting", ["memory", "MEMORY", " memory ", "", None])
    def test_memory_is_the_default(self, setting):
        assert isinstance(load_backend(setting), MemoryBackend)

    def test_no_argument_means_memory(self):
        assert isinstance(load_backend(), MemoryBackend)

    def test_options_are_passed_on(self):
        backend = load_backend("memory", some_option=3)
        assert backend.options == {"some_option": 3}

    @pytest.mark.parametrize(
        "setting",
        [
            "tests.backends.test_memory:CustomBackend",
            "tests.backends.test_memory.CustomBackend",
        ],
    )
    def test_dotted_name_of_a_backend_subclass(self, setting):
        backend = load_backend(setting, answer=42)
        assert isinstance(backend, CustomBackend)
        assert backend.options == {"answer": 42}

    def test_an_instance_is_returned_as_is(self):
        backend = MemoryBackend()
        assert load_backend(backend) is backend

    @pytest.mark.parametrize(
        "setting, fragment",
        [
            ("tests.backends.test_memory:NotABackend", "not a subclass"),
            ("tests.backends.test_memory:missing", "has no attribute"),
            ("no_such_module_anywhere:Backend", "cannot import"),
            ("mysql://localhost/db", "unknown URL scheme"),
            ("nonsense", "is not a backend"),
        ],
    )
    def test_a_bad_value_says_what_is_accepted(self, setting, fragment):
        with pytest.raises(IncorrectlyConfigured) as excinfo:
            load_backend(setting)
        message = str(excinfo.value)
        assert fragment in message
        assert setting in message
        if fragment != "not a subclass":
            assert "'memory', a redis://" in message

    def test_a_non_string_value_is_refused(self):
        with pytest.raises(IncorrectlyConfigured):
            load_backend(42)
