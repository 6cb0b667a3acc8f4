"""A cluster of private RabbitMQ nodes on 127.0.0.1 (tests and the fault-injection runs).

Every node is a :class:`broker.local_node.LocalRabbitNode` with its own name, ports and data;
they share one Erlang cookie and one epmd, boot at once, and nodes 2..n then join node 1
(``rabbitmqctl stop_app; join_cluster; start_app``). Declare the topology *after*
:meth:`LocalRabbitCluster.start` so every quorum queue gets a replica on each node (RabbitMQ's
default initial group size is the cluster size, up to 5 here... we check ``members``).

Clients reach the cluster with a comma-separated list of the nodes' URLs
(:func:`broker.connection.connect` tries them in order), or through a load balancer.
"""

from __future__ import annotations

import logging
import secrets
import string
import threading
import time
from types import TracebackType

from fedmq.broker.local_node import NODE_ADMIN_USER, LocalNodeError, LocalRabbitNode, free_port
from testkit.broker import _ACTING_USER, _erl_binary

logger = logging.getLogger(__name__)


class LocalRabbitCluster:
    def __init__(
        self, size: int = 3, *, username: str = NODE_ADMIN_USER, password: str | None = None, start_timeout: float = 120.0
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        password = password or secrets.token_urlsafe(24)  # one administrator for every node: they share users
        cookie = "".join(secrets.choice(string.ascii_uppercase) for _ in range(32))
        epmd = free_port("127.0.0.1")
        self.nodes: list[LocalRabbitNode] = []
        try:
            for _ in range(size):
                self.nodes.append(LocalRabbitNode(cookie=cookie, epmd_port=epmd, username=username, password=password,
                                                  start_timeout=start_timeout))
        except BaseException:
            self.close()
            raise
        self.username, self.password = username, password

    # -------------------------------------------------------------------------- lifecycle
    def start(self) -> float:
        """Boot every node at once, then join nodes 2..n to node 1 one at a time; returns seconds.

        A node boots alone (its own database) and joins afterwards, so node 1 need not be up
        before the others boot; the joins are serial because concurrent joins race in mnesia's
        schema merge."""
        t0 = time.monotonic()
        first = self.nodes[0]
        errors: list[BaseException] = []
        first_up = threading.Event()
        join_lock = threading.Lock()

        def boot(node: LocalRabbitNode) -> None:
            try:
                node.start()
                if node is first:
                    return
                first_up.wait()
                if errors:
                    return
                with join_lock:
                    node.rabbitmqctl("stop_app")
                    node.rabbitmqctl("join_cluster", first.node_name, timeout=120)
                    try:
                        # synchronous: returns once the app runs again, now in the cluster
                        node.rabbitmqctl("start_app", timeout=120)
                    except Exception:  # one retry: a busy 2-core host can time mnesia out
                        time.sleep(2)
                        node.rabbitmqctl("start_app", timeout=120)
            except BaseException as exc:  # re-raised below, in the caller's thread
                errors.append(exc)
            finally:
                if node is first:
                    first_up.set()

        threads = [threading.Thread(target=boot, args=(n,), daemon=True) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        self.wait_running(len(self.nodes))
        logger.info("cluster of %d nodes ready in %.1fs", len(self.nodes), time.monotonic() - t0)
        return time.monotonic() - t0

    def running_nodes(self, via: LocalRabbitNode | None = None) -> list[str]:
        node = via or next(n for n in self.nodes if n.running)
        out = node.rabbitmqctl("eval", "rabbit_nodes:all_running().")
        return sorted(part.strip(" '\n[]") for part in out.strip().strip("[]").split(",") if part.strip(" '\n[]"))

    def wait_running(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if len(self.running_nodes()) >= n:
                    return
            except LocalNodeError:
                pass
            if time.monotonic() > deadline:
                raise LocalNodeError(f"cluster did not reach {n} running nodes within {timeout:.0f}s")
            time.sleep(0.5)

    def stop_node(self, index: int) -> None:
        """Stop one node (its data stays; :meth:`start_node` brings it back into the cluster)."""
        self.nodes[index].stop()

    def start_node(self, index: int) -> None:
        self.nodes[index].start()

    def close(self) -> None:
        # the others first: the shared epmd goes with the last node
        for node in reversed(self.nodes):
            try:
                node.close()
            except Exception:
                logger.exception("closing %s failed", node.node_name)

    def __enter__(self) -> "LocalRabbitCluster":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -------------------------------------------------------------------------- control / URLs
    def rabbitmqctl(self, *args: str, timeout: float = 60.0) -> str:
        """rabbitmqctl against the first running node."""
        node = next(n for n in self.nodes if n.running)
        return node.rabbitmqctl(*args, timeout=timeout)

    def add_vhost(self, name: str) -> None:
        """``name`` with full rights for the administrator: one ``rabbitmqctl eval`` (the internal
        calls ``add_vhost`` and ``set_permissions`` make) instead of an Erlang VM start for each."""
        acting, vhost, all_ = _erl_binary(_ACTING_USER), _erl_binary(name), _erl_binary(".*")
        self.rabbitmqctl("eval", f"ok = rabbit_vhost:add({vhost}, {acting}), "
                                 f"ok = rabbit_auth_backend_internal:set_permissions({_erl_binary(self.username)}, "
                                 f"{vhost}, {all_}, {all_}, {all_}, {acting}).")

    def urls(self, vhost: str = "/", *, username: str | None = None, password: str | None = None) -> list[str]:
        return [n.url_for_vhost(vhost, username=username, password=password) for n in self.nodes]

    def url(self, vhost: str = "/", *, username: str | None = None, password: str | None = None) -> str:
        """All nodes' URLs, comma separated (what ``amqp_url`` settings accept)."""
        return ",".join(self.urls(vhost, username=username, password=password))

    def queue_members(self, vhost: str, queue: str) -> list[str]:
        """The nodes holding a replica of quorum queue ``queue``."""
        out = self.rabbitmqctl("list_queues", "-p", vhost, "name", "members", "--no-table-headers")
        for line in out.splitlines():
            name, _, members = line.partition("\t")
            if name.strip() == queue:
                return sorted(m.strip(" '") for m in members.strip().strip("[]").split(",") if m.strip(" '"))
        return []
