"""The in-memory backend, and :func:`stargate.backends.load_backend`."""

import pytest

from stargate.backends import load_backend
from stargate.backends.base import Backend, HistoryPolicy
from stargate.backends.memory import MemoryBackend
from stargate.exceptions import (
    BackendUnavailable,
    HistoryUnavailable,
    IncorrectlyConfigured,
)
from tests import green
from tests.backends.contract import BackendContract


class TestMemoryBackendContract(BackendContract):
    backends = ["memory"]
    shared = False


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clocked():
    """A started memory backend whose clock the test moves."""
    backend = MemoryBackend()
    backend._clock = clock = FakeClock()
    backend.start(lambda *args: None)
    yield backend, clock
    backend.close()


BRIEF = HistoryPolicy(size=10, ttl=5.0)


class TestMemoryHistoryIsForgotten:
    """Defect 8: expired history, and the channel it belonged to, leave the
    process's memory; a history forgotten is a history lost (new epoch)."""

    def test_expired_channels_are_forgotten(self, clocked):
        backend, clock = clocked
        for i in range(1000):
            backend.publish(f"c{i}", "x", history=BRIEF)
        assert len(backend._histories) == 1000
        clock.now += 6
        backend.publish("fresh", "y", history=BRIEF)
        assert list(backend._histories) == ["fresh"]

    def test_a_channel_read_after_its_ttl_is_forgotten(self, clocked):
        backend, clock = clocked
        first = backend.publish("c", "old", history=BRIEF)
        clock.now += 6
        with pytest.raises(HistoryUnavailable) as caught:
            backend.history("c", first)
        assert caught.value.offset == 0 and caught.value.epoch != first.epoch
        assert list(backend._histories) == []

    def test_a_forgotten_channel_starts_a_new_epoch(self, clocked):
        backend, clock = clocked
        first = backend.publish("c", "old", history=BRIEF)
        clock.now += 6
        second = backend.publish("c", "new", history=BRIEF)
        # Never the same position for two messages: a client holding the
        # old one is told its history is gone, not given the new messages
        # as if nothing had been missed.
        assert second.offset == 1 and second.epoch != first.epoch
        with pytest.raises(HistoryUnavailable):
            backend.history("c", first)
        assert backend.history("c", (second.epoch, 0)) == [(second, "new")]

    def test_channels_still_in_their_ttl_are_kept(self, clocked):
        backend, clock = clocked
        kept = backend.publish("kept", "a", history=BRIEF)
        clock.now += 4
        backend.publish("kept", "b", history=BRIEF)
        backend.publish("other", "c", history=BRIEF)
        clock.now += 4  # "kept" published 4 s ago: still in its ttl
        backend.publish("third", "d", history=BRIEF)
        assert [m for _, m in backend.history("kept", kept)] == ["b"]
        assert set(backend._histories) == {"kept", "other", "third"}


class TestMemoryBackend:
    def test_is_synchronous(self):
        assert MemoryBackend.synchronous is True

    def test_publish_delivers_in_the_callers_green_thread(self):
        backend = MemoryBackend()
        seen = []
        backend.start(
            lambda channel, message: seen.append((channel, message, green.getcurrent()))
        )
        backend.subscribe("c")
        backend.publish("c", "now")
        assert seen == [("c", "now", green.getcurrent())]

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

    def test_an_unknown_option_is_refused_by_name(self):
        with pytest.raises(IncorrectlyConfigured) as caught:
            load_backend("memory", some_option=3)
        assert "stargate.backend.some_option" in str(caught.value)
        assert "MemoryBackend" in str(caught.value)

    @pytest.mark.parametrize(
        "url, option",
        [
            ("redis://127.0.0.1:1/0", "presence_tll"),
            ("redis+cluster://127.0.0.1:1", "histroy_size"),
            ("redis+streams://127.0.0.1:1/0", "presence_ttl"),
        ],
    )
    def test_unknown_options_of_the_redis_backends_are_refused(self, url, option):
        with pytest.raises(IncorrectlyConfigured) as caught:
            load_backend(url, **{option: "1"})
        message = str(caught.value)
        assert f"stargate.backend.{option}" in message
        assert "prefix" in message  # it says what is accepted

    def test_every_scheme_load_backend_takes_is_one_its_backend_takes(self):
        from stargate.backends import REDIS_SCHEMES, STREAMS_SCHEMES
        from stargate.backends.redis import RedisBackend
        from stargate.backends.redis_streams import RedisStreamsBackend

        assert "rediss+cluster://" in REDIS_SCHEMES
        for schemes, cls in (
            (REDIS_SCHEMES, RedisBackend),
            (STREAMS_SCHEMES, RedisStreamsBackend),
        ):
            for scheme in schemes:
                host = "/tmp/redis.sock" if scheme == "unix://" else "127.0.0.1:1"
                backend = load_backend(f"{scheme}{host}")
                assert type(backend) is cls, scheme
            assert cls.schemes == schemes

    def test_rediss_cluster_is_a_tls_cluster(self):
        backend = load_backend("rediss+cluster://127.0.0.1:1")
        assert backend.cluster and backend._client_url.startswith("rediss://")

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
