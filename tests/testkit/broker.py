"""Finding a RabbitMQ broker for tests, the demo and ``fedmq broker local``.

:func:`open_test_broker` tries, in order:

1. ``FEDMQ_TEST_AMQP_URL`` when set: an external broker someone already runs;
2. a private :class:`~broker.local_node.LocalRabbitNode` when ``rabbitmq-server`` is installed;
3. testcontainers' ``RabbitMqContainer`` when a Docker engine answers;

and otherwise raises :class:`BrokerUnavailableError` saying how to get one.

Isolation between tests. Each test asks :meth:`Broker.new_namespace` for a :class:`Namespace`:

- ``vhost`` isolation (private node, container, or an external broker whose node is named in
  ``FEDMQ_TEST_RABBITMQ_NODE``): a fresh vhost per test, granted to the URL's user and deleted
  afterwards with everything in it. Queue names need no prefix (``Namespace.prefix == ""``), so
  code under test can use its real topology names.
- ``prefix`` isolation (an external broker we cannot administer): the URL's own vhost is shared
  and ``Namespace.prefix`` is a unique string that tests must put in front of every queue and
  exchange name. Nothing is deleted afterwards, so such tests should declare auto-delete or
  exclusive objects. We do not guess a ``rabbitmqctl`` target for an external URL, because the
  default node is often a different broker (for example the system one on 5672). With
  ``FEDMQ_TEST_RABBITMQ_NODE`` set, ``rabbitmqctl`` runs as the current user and so uses that
  user's ``~/.erlang.cookie``, which must match the node's.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from fedmq.broker.local_node import NODE_ADMIN_USER, BrokerHarnessError, LocalNodeError, LocalRabbitNode, find_rabbitmq_install

logger = logging.getLogger(__name__)

ENV_AMQP_URL = "FEDMQ_TEST_AMQP_URL"
ENV_EXTERNAL_NODE = "FEDMQ_TEST_RABBITMQ_NODE"
DEFAULT_CONTAINER_IMAGE = "rabbitmq:3.13-management"
_VHOST_ROOT = "fedmq-test"

__all__ = [
    "ENV_AMQP_URL",
    "ENV_EXTERNAL_NODE",
    "Broker",
    "BrokerHarnessError",
    "BrokerUnavailableError",
    "Namespace",
    "docker_engine_available",
    "find_rabbitmq_install",
    "open_test_broker",
    "url_with_vhost",
]


class BrokerUnavailableError(BrokerHarnessError):
    """No broker could be found or started."""


@dataclass(frozen=True)
class Namespace:
    """Where one test may put its broker objects.

    Attributes:
        url: AMQP URL whose vhost is ``vhost`` (percent-encoded).
        vhost: the vhost name, unencoded.
        prefix: put it before every queue/exchange name; empty under vhost isolation.
        isolation: ``"vhost"`` (own vhost, deleted afterwards) or ``"prefix"`` (shared vhost).
    """

    url: str
    vhost: str
    prefix: str
    isolation: Literal["vhost", "prefix"]


def url_with_vhost(url: str, vhost: str) -> str:
    """Return ``url`` with its vhost replaced by ``vhost``, percent-encoded (``/`` is ``%2F``)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), parts.query, parts.fragment))


def _vhost_of(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _user_of(url: str) -> str:
    return unquote(urlsplit(url).username or "guest")


def _erl_binary(text: str) -> str:
    """``text`` as an Erlang binary literal for ``rabbitmqctl eval``."""
    return '<<"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"/utf8>>'


#: the acting user RabbitMQ records for vhosts the harness creates and deletes through ``eval``
_ACTING_USER = "fedmq-test-harness"


def _label(text: str) -> str:
    """A short, readable, vhost- and queue-name-safe form of a test name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40] or "ns"


class Broker:
    """One broker for a test session, whatever provides it.

    Build it with :func:`open_test_broker` and close it (or use ``with``). ``rabbitmqctl`` and
    ``restart`` are only offered when the source supports them; check ``can_rabbitmqctl`` and
    ``can_restart`` first.
    """

    def __init__(
        self,
        url: str,
        *,
        source: Literal["env", "local", "container"],
        ctl: Callable[..., str] | None = None,
        restart: Callable[[], object] | None = None,
        close: Callable[[], None] | None = None,
        node: LocalRabbitNode | None = None,
    ) -> None:
        self.url = url
        self.source = source
        self.node = node
        self._ctl = ctl
        self._restart = restart
        self._close = close
        self._retired: list[Namespace] = []
        self._retired_users: list[str] = []
        self._spare: list[str] = []  # vhosts made ahead (new_namespace), not yet handed out

    def __repr__(self) -> str:
        return f"Broker(source={self.source!r}, url={self.url!r})"

    @property
    def can_restart(self) -> bool:
        return self._restart is not None

    @property
    def can_rabbitmqctl(self) -> bool:
        return self._ctl is not None

    def restart(self) -> None:
        """Restart the broker; durable queues and persistent messages survive, the URL stays valid."""
        if self._restart is None:
            raise BrokerHarnessError(f"the {self.source} broker cannot be restarted by the harness")
        logger.info("restarting %r", self)
        self._restart()

    def rabbitmqctl(self, *args: str) -> str:
        """Run ``rabbitmqctl`` against this broker and return stdout; raises on failure."""
        if self._ctl is None:
            raise BrokerHarnessError(
                f"no rabbitmqctl for the {self.source} broker (set {ENV_EXTERNAL_NODE} for an external one)"
            )
        return self._ctl(*args)

    #: vhosts made ahead by one ``rabbitmqctl`` call: each call starts an Erlang VM (about half
    #: a second of CPU, a second or two of wall on a busy machine), and a worker's tests ask for
    #: some twenty vhosts, one each
    VHOST_BATCH = 8

    def new_namespace(self, label: str = "ns") -> Namespace:
        """Create an isolated place for one test (see the module docstring for the two modes)."""
        if self._ctl is None:
            prefix = f"{_VHOST_ROOT}.{_label(label)}.{secrets.token_hex(4)}."
            return Namespace(url=self.url, vhost=_vhost_of(self.url), prefix=prefix, isolation="prefix")
        if not self._spare:
            self._spare = self._make_vhosts(self.VHOST_BATCH)
        vhost = self._spare.pop(0)
        logger.info("vhost %s for %s", vhost, label)
        return Namespace(url=url_with_vhost(self.url, vhost), vhost=vhost, prefix="", isolation="vhost")

    def _make_vhosts(self, count: int) -> list[str]:
        """``count`` fresh vhosts, each granted to the URL's user, in one ``rabbitmqctl`` call
        (``eval``: the same internal calls ``add_vhost`` and ``set_permissions`` make). Nobody
        else knows their names; one not handed out is deleted with the retired ones."""
        token = secrets.token_hex(4)
        # The "/" forces percent-encoding to be right in every URL the harness hands out.
        vhosts = [f"{_VHOST_ROOT}/{token}-{i}" for i in range(count)]
        acting, user, all_ = _erl_binary(_ACTING_USER), _erl_binary(_user_of(self.url)), _erl_binary(".*")
        listed = ", ".join(_erl_binary(v) for v in vhosts)
        self._ctl("eval", f"[begin ok = rabbit_vhost:add(V, {acting}), "
                          f"ok = rabbit_auth_backend_internal:set_permissions({user}, V, {all_}, {all_}, {all_}, {acting}) "
                          f"end || V <- [{listed}]], ok.")
        return vhosts

    def drop_namespace(self, namespace: Namespace) -> None:
        """Delete a namespace's vhost and everything in it (nothing to do under prefix isolation)."""
        if namespace.isolation == "vhost":
            self.rabbitmqctl("delete_vhost", namespace.vhost)

    def retire_namespace(self, namespace: Namespace) -> None:
        """A test is done with ``namespace``: nobody uses it again, and it is deleted when the
        broker closes, all retired vhosts in one ``rabbitmqctl`` call. A private node is deleted
        whole when it closes, so its vhosts cost no call at all. (Per-test fixtures use this;
        :meth:`drop_namespace` deletes at once.)"""
        if namespace.isolation == "vhost":
            self._retired.append(namespace)

    def retire_users(self, users: Iterable[str]) -> None:
        """Users a test created and is done with: deleted when the broker closes, all in one
        ``rabbitmqctl`` call, or not at all on a private node, which is deleted whole (a
        ``delete_user`` each cost a test about a second of Erlang VM start)."""
        self._retired_users.extend(users)

    def _drop_retired(self) -> None:
        retired, self._retired = self._retired, []
        users, self._retired_users = self._retired_users, []
        spare, self._spare = self._spare, []
        if self.source == "local" or self._ctl is None:
            return
        acting = _erl_binary(_ACTING_USER)
        for what, names, call in (
            ("vhosts", [ns.vhost for ns in retired] + spare, f"rabbit_vhost:delete(V, {acting})"),
            ("users", users, f"rabbit_auth_backend_internal:delete_user(V, {acting})"),
        ):
            if not names:
                continue
            listed = ", ".join(_erl_binary(n) for n in names)
            try:
                self._ctl("eval", f"[{call} || V <- [{listed}]], ok.")
            except BrokerHarnessError as exc:  # cleanup only: the broker is going away or someone else's
                logger.warning("could not delete %d test %s: %s", len(names), what, exc)

    def close(self) -> None:
        """Delete retired namespaces and stop whatever the harness started; idempotent."""
        self._drop_retired()
        close, self._close = self._close, None
        if close is not None:
            close()

    def __enter__(self) -> Broker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def docker_engine_available(timeout: float = 15.0) -> bool:
    """True when a Docker engine answers ``docker info`` (a CLI alone is not enough)."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        result = subprocess.run(  # noqa: S603
            [docker, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.info("docker info failed: %s", exc)
        return False
    if result.returncode != 0:
        logger.info("no Docker engine: %s", result.stderr.strip())
        return False
    return True


def _external_broker(url: str, env: Mapping[str, str]) -> Broker:
    node = env.get(ENV_EXTERNAL_NODE)
    install = find_rabbitmq_install() if node else None
    if node and install is None:
        raise BrokerUnavailableError(f"{ENV_EXTERNAL_NODE}={node} is set but rabbitmqctl was not found")
    if install is None or not node:
        logger.info("external broker without rabbitmqctl: tests are isolated by name prefix")
        return Broker(url, source="env")

    def ctl(*args: str) -> str:
        result = subprocess.run(  # noqa: S603
            [str(install.ctl), "-n", node, "-q", *args], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise BrokerHarnessError(f"rabbitmqctl -n {node} {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    return Broker(url, source="env", ctl=ctl)


def _local_broker(node_options: Mapping[str, Any]) -> Broker:
    node = LocalRabbitNode(**node_options)
    try:
        node.start()
    except BaseException:
        node.close()
        raise
    return Broker(node.amqp_url, source="local", ctl=node.rabbitmqctl, restart=node.restart, close=node.close, node=node)


def _container_broker(image: str) -> Broker:
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer
    except ImportError:  # testcontainers < 4.9 kept it here
        from testcontainers.rabbitmq import RabbitMqContainer  # type: ignore[no-redef]

    # an administrator of our own instead of the image's guest (no guest where fedmq runs)
    password = secrets.token_urlsafe(24)
    container = RabbitMqContainer(image=image, username=NODE_ADMIN_USER, password=password)
    container.start()
    try:
        params = container.get_connection_params()
        url = f"amqp://{NODE_ADMIN_USER}:{quote(password, safe='')}@{params.host}:{params.port}/%2F"

        def ctl(*args: str) -> str:
            code, output = container.exec(["rabbitmqctl", "-q", *args])
            text = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
            if code != 0:
                raise BrokerHarnessError(f"rabbitmqctl {' '.join(args)} in container: {text.strip()}")
            return text

        def restart() -> None:
            # Restarting the container would move its published port; restarting the RabbitMQ
            # application inside it reloads queues from disk the same way a node restart does.
            ctl("stop_app")
            ctl("start_app")
            ctl("await_startup")

    except BaseException:
        container.stop()
        raise
    return Broker(url, source="container", ctl=ctl, restart=restart, close=container.stop)


def open_test_broker(
    env: Mapping[str, str] | None = None,
    *,
    container_image: str = DEFAULT_CONTAINER_IMAGE,
    **node_options: Any,
) -> Broker:
    """Find or start a broker: ``FEDMQ_TEST_AMQP_URL``, else a private node, else Docker.

    Args:
        env: the environment to read (``os.environ`` when None, read at call time).
        container_image: image used when falling back to Docker.
        node_options: passed to :class:`~broker.local_node.LocalRabbitNode`.

    Raises:
        BrokerUnavailableError: none of the three sources is available.
    """
    env = os.environ if env is None else env
    url = env.get(ENV_AMQP_URL)
    if url:
        logger.info("using external broker from %s", ENV_AMQP_URL)
        return _external_broker(url, env)
    if find_rabbitmq_install() is not None:
        try:
            return _local_broker(node_options)
        except LocalNodeError as exc:
            raise BrokerUnavailableError(f"rabbitmq-server is installed but the private node failed: {exc}") from exc
    if docker_engine_available():
        logger.info("no rabbitmq-server; starting %s with testcontainers", container_image)
        return _container_broker(container_image)
    raise BrokerUnavailableError(
        "no RabbitMQ broker is available for the tests. Any one of these fixes it:\n"
        "  - install RabbitMQ locally (Debian/Ubuntu: `apt-get install rabbitmq-server`); the tests\n"
        "    start their own private node and do not need the system service running;\n"
        "  - start a Docker engine (`docker info` must succeed) so testcontainers can run "
        f"{container_image};\n"
        f"  - point {ENV_AMQP_URL} at a broker you run, e.g. amqp://USER:PASSWORD@127.0.0.1:5672/%2F\n"
        f"    (and set {ENV_EXTERNAL_NODE} to its node name for per-test vhosts)."
    )
