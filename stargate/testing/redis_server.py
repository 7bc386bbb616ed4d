"""Private ``redis-server`` processes for tests.

:class:`RedisServer` starts one server on a free 127.0.0.1 port, in its own
temporary directory, with persistence off; :class:`RedisCluster` starts three
cluster-enabled masters and joins them into a cluster. Both are context
managers and stop only the processes they started, by PID. Neither ever
touches a Redis someone else runs (such as one on port 6379)::

    with RedisServer() as server:
        backend = RedisBackend(server.url)
        ...
        server.kill()      # SIGKILL: Redis vanishes mid-stream
        server.restart()   # same port, empty dataset

They talk to the servers with redis-py's blocking client and work with or
without eventlet's monkey-patching.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis

__all__ = [
    "RedisServer",
    "RedisCluster",
    "RedisServerNotFound",
    "RedisServerFailed",
    "find_redis_server",
]

#: Seconds a server gets to answer PING after it was started.
DEFAULT_START_TIMEOUT = 10.0
#: Seconds a cluster gets to report ``cluster_state:ok``.
DEFAULT_CLUSTER_TIMEOUT = 20.0
#: Seconds a stopped server gets to exit before it is killed.
STOP_TIMEOUT = 5.0
#: Number of hash slots in a Redis cluster.
CLUSTER_SLOTS = 16384


class RedisServerNotFound(RuntimeError):
    """The ``redis-server`` binary is not installed (or not on ``PATH``)."""


class RedisServerFailed(RuntimeError):
    """A private ``redis-server`` did not start or did not become ready."""


def find_redis_server(binary=None):
    """Return the path of ``redis-server``, or raise :class:`RedisServerNotFound`.

    ``binary`` overrides the search; otherwise ``$STARGATE_REDIS_SERVER``,
    then ``PATH``, then ``/usr/bin`` and ``/usr/local/bin``.
    """
    candidates = [binary, os.environ.get("STARGATE_REDIS_SERVER")]
    candidates.append(shutil.which("redis-server"))
    candidates += ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise RedisServerNotFound(
        "redis-server is not installed: install Redis (e.g. apt-get install "
        "redis-server) or set STARGATE_REDIS_SERVER to its path"
    )


def _port_is_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster_bus=False):
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    With ``cluster_bus``, port + 10000 (the cluster bus port) is free too.
    """
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port == 6379:
            continue
        if not cluster_bus:
            return port
        if port + 10000 < 65536 and _port_is_free(port + 10000):
            return port
    raise RedisServerFailed("could not find a free port on 127.0.0.1")


class RedisServer:
    """One private ``redis-server`` on 127.0.0.1.

    ``port`` defaults to a free one; ``extra_args`` are appended to the
    command line (e.g. ``["--cluster-enabled", "yes"]``). Attributes:
    ``port``, ``url`` (``redis://127.0.0.1:<port>/0``), ``pid`` (``None``
    while stopped), ``dir`` (the temporary working directory).
    """

    def __init__(
        self,
        port=None,
        *,
        extra_args=(),
        binary=None,
        start_timeout=DEFAULT_START_TIMEOUT,
        cluster_bus=False,
    ):
        self.binary = find_redis_server(binary)
        self._fixed_port = port
        self.port = port
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.cluster_bus = cluster_bus
        self.dir: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs):
        """A blocking redis-py client for this server (close it when done)."""
        kwargs.setdefault("socket_timeout", 5)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self):
        """Start the server and wait until it answers PING."""
        if self.running:
            return self
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="stargate-redis-")
        attempts = 1 if self._fixed_port or self.port else 5
        for attempt in range(attempts):
            if self.port is None:
                self.port = free_port(cluster_bus=self.cluster_bus)
            try:
                self._spawn()
                return self
            except RedisServerFailed:
                if attempt + 1 == attempts:
                    raise
                self.port = None  # somebody took the port: pick another one
        return self

    def _spawn(self):
        directory = self.dir
        assert directory is not None, "start() makes the directory first"
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", directory,
            "--daemonize", "no",
            "--logfile", os.path.join(directory, "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.start_timeout
        last_error = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RedisServerFailed(
                    f"redis-server on port {self.port} exited with status {code}"
                    f" at start-up; see {os.path.join(directory, 'redis.log')}"
                )
            try:
                with self.client(socket_timeout=1, socket_connect_timeout=1) as c:
                    if c.ping():
                        return
            except redis.RedisError as exc:
                last_error = exc
            time.sleep(0.02)
        self._terminate(signal.SIGKILL)
        raise RedisServerFailed(
            f"redis-server on port {self.port} did not answer PING within "
            f"{self.start_timeout} s (last error: {last_error})"
        )

    def _terminate(self, sig):
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)

    def stop(self):
        """Stop the server politely (SIGTERM), then by force if it lingers."""
        self._terminate(signal.SIGTERM)

    def kill(self):
        """Kill the server with SIGKILL, as a crash or an OOM killer would."""
        self._terminate(signal.SIGKILL)

    def restart(self):
        """Start the server again on the same port (after stop or kill)."""
        if self.running:
            self.stop()
        self._fixed_port = self.port
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                self._spawn()
                return self
            except RedisServerFailed:
                # The port may still be held by the dying process's sockets.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self):
        """Stop the server and remove its directory."""
        self.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return f"<RedisServer 127.0.0.1:{self.port} pid={self.pid}>"


class RedisCluster:
    """Private cluster-enabled masters (three by default) joined into one
    cluster, each with ``replicas`` replicas.

    The slots are split evenly (``CLUSTER ADDSLOTSRANGE``), the nodes are
    introduced with ``CLUSTER MEET``, each replica follows its master
    (``CLUSTER REPLICATE``), and :meth:`start` returns once every node
    reports ``cluster_state:ok`` and every replica's link to its master is
    up. ``url`` is a ``redis+cluster://`` URL for the first node; ``urls``
    and ``servers`` list them all (masters first, then the replicas of the
    first master, of the second...). For fault tests: :meth:`master_of`,
    :meth:`move_slots`, :meth:`wait_for_failover`,
    :meth:`wait_for_replicas`.
    """

    def __init__(
        self,
        masters=3,
        *,
        replicas=0,
        binary=None,
        start_timeout=DEFAULT_CLUSTER_TIMEOUT,
        node_timeout_ms=2000,
    ):
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        self.masters = masters
        self.replicas = replicas
        self.start_timeout = start_timeout
        extra = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
        ]  # fmt: skip
        self.servers = [
            RedisServer(binary=binary, extra_args=extra, cluster_bus=True)
            for _ in range(masters * (1 + replicas))
        ]

    @property
    def url(self):
        return f"redis+cluster://127.0.0.1:{self.servers[0].port}"

    @property
    def urls(self):
        return [server.url for server in self.servers]

    def start(self):
        try:
            for server in self.servers:
                server.start()
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self):
        clients = [server.client() for server in self.servers]
        try:
            count = len(clients)
            masters = self.masters
            for index, client in enumerate(clients[:masters]):
                first = index * CLUSTER_SLOTS // masters
                last = (index + 1) * CLUSTER_SLOTS // masters - 1
                client.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
            for server in self.servers[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", server.port)
            deadline = time.monotonic() + self.start_timeout
            for index, client in enumerate(clients[masters:]):
                master = self._node_id(clients[index // self.replicas])
                # A replica can follow its master once it knows of it.
                self._until(
                    deadline,
                    lambda: self._knows(client, master),
                    "a replica never learnt of its master",
                )
                client.execute_command("CLUSTER REPLICATE", master)
            self._until(
                deadline,
                lambda: (
                    all(self._ready(c, count) for c in clients)
                    and all(self._replica_up(c) for c in clients[masters:])
                ),
                "the cluster did not reach cluster_state:ok",
            )
        finally:
            for client in clients:
                client.close()

    def _until(self, deadline, predicate, what):
        while not predicate():
            if time.monotonic() > deadline:
                raise RedisServerFailed(
                    f"{what} within {self.start_timeout} s (ports "
                    f"{[s.port for s in self.servers]})"
                )
            time.sleep(0.05)

    @staticmethod
    def _node_id(client):
        node_id = client.execute_command("CLUSTER MYID")
        return node_id.decode() if isinstance(node_id, bytes) else node_id

    @staticmethod
    def _nodes(client):
        """``CLUSTER NODES`` as a list of dicts (id, port, flags, slots)."""
        text = client.execute_command("CLUSTER NODES")
        if isinstance(text, bytes):
            text = text.decode()
        if isinstance(text, dict):  # some redis-py versions parse it
            text = "\n".join(
                f"{v['node_id']} {k} {v['flags']} {v.get('master_id', '-')}"
                for k, v in text.items()
            )
        nodes = []
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            address = fields[1].split("@")[0]
            nodes.append(
                {
                    "id": fields[0],
                    "port": int(address.rsplit(":", 1)[1] or 0),
                    "flags": fields[2].split(","),
                }
            )
        return nodes

    def _knows(self, client, node_id):
        return any(node["id"] == node_id for node in self._nodes(client))

    @staticmethod
    def _info(client, section):
        info = client.execute_command("INFO", section)
        if isinstance(info, bytes):
            info = info.decode()
        if isinstance(info, dict):
            return {k: str(v) for k, v in info.items()}
        return dict(line.split(":", 1) for line in info.splitlines() if ":" in line)

    def _replica_up(self, client):
        info = self._info(client, "replication")
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def server_on(self, port):
        return next(s for s in self.servers if s.port == port)

    def master_of(self, slot):
        """The :class:`RedisServer` that serves ``slot`` now, as a running
        node sees it."""
        for server in self.servers:
            if not server.running:
                continue
            with server.client() as client:
                reply = client.execute_command("CLUSTER SLOTS")
            for entry in reply:
                first, last, master = entry[0], entry[1], entry[2]
                if first <= slot <= last:
                    return self.server_on(int(master[1]))
        raise RedisServerFailed(f"no running node serves slot {slot}")

    def move_slots(self, slots, target):
        """Move ``slots`` to the master ``target`` (a :class:`RedisServer`)
        the way ``redis-cli --cluster reshard`` does: IMPORTING on the
        target, MIGRATING on the owner, keys moved with MIGRATE, then every
        master is told the new owner."""
        with target.client() as dest:
            target_id = self._node_id(dest)
            for slot in slots:
                source = self.master_of(slot)
                if source is target:
                    continue
                with source.client() as src:
                    source_id = self._node_id(src)
                    dest.execute_command(
                        "CLUSTER SETSLOT", slot, "IMPORTING", source_id
                    )
                    src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
                    while True:
                        keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
                        if not keys:
                            break
                        src.execute_command(
                            "MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                            "KEYS", *keys,
                        )  # fmt: skip
                    dest.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
                    src.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
                for server in self.servers:
                    if server.running and server not in (source, target):
                        with server.client() as other:
                            if "master" in self._info(other, "replication").get(
                                "role", ""
                            ):
                                other.execute_command(
                                    "CLUSTER SETSLOT", slot, "NODE", target_id
                                )

    def wait_for_failover(self, slot, dead, timeout=None):
        """Wait until a node other than ``dead`` serves ``slot`` and the
        cluster is ``ok`` again; returns the new master."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while True:
            try:
                master = self.master_of(slot)
                if master is not dead and all(
                    self._state_ok(server) for server in self.servers if server.running
                ):
                    return master
            except (redis.RedisError, RedisServerFailed):
                pass
            if time.monotonic() > deadline:
                raise RedisServerFailed(f"slot {slot} was not failed over in time")
            time.sleep(0.05)

    def wait_for_replicas(self, timeout=None):
        """Wait until every running replica's link to its master is up: a
        replica restarted a moment ago (after :meth:`wait_for_failover`, as
        a replica of the new master) would refuse to take over while it has
        never synced."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while True:
            linked = True
            for server in self.servers:
                if not server.running:
                    continue
                try:
                    with server.client() as client:
                        info = self._info(client, "replication")
                except redis.RedisError:
                    linked = False
                    break
                link = info.get("master_link_status", "up")  # "up" on a master
                if link != "up":
                    linked = False
                    break
            if linked:
                return
            if time.monotonic() > deadline:
                raise RedisServerFailed("a replica did not sync with its master")
            time.sleep(0.05)

    def _state_ok(self, server):
        with server.client() as client:
            return self._cluster_info(client).get("cluster_state") == "ok"

    @staticmethod
    def _cluster_info(client):
        info = client.execute_command("CLUSTER INFO")
        if isinstance(info, bytes):
            info = info.decode()
        if isinstance(info, dict):
            return {k: str(v) for k, v in info.items()}
        return dict(line.split(":", 1) for line in info.splitlines() if ":" in line)

    @staticmethod
    def _ready(client, count):
        info = client.execute_command("CLUSTER INFO")
        if isinstance(info, bytes):
            info = info.decode()
        if isinstance(info, dict):
            fields = {k: str(v) for k, v in info.items()}
        else:
            fields = dict(
                line.split(":", 1) for line in info.splitlines() if ":" in line
            )
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_known_nodes") == str(count)
            and fields.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
        )

    def close(self):
        for server in self.servers:
            server.close()

    stop = close

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        ports = ",".join(str(s.port) for s in self.servers)
        return f"<RedisCluster 127.0.0.1:{ports}>"
