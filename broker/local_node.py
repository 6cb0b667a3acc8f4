"""A private, throw-away RabbitMQ node started from the locally installed ``rabbitmq-server``.

Tests, the demo and ``fedmq broker local`` need a real broker (quorum queues, restarts,
permissions) without touching whatever system broker may already run on 5672, and without
Docker. :class:`LocalRabbitNode` therefore starts a node with its own name, AMQP port,
distribution port, epmd port, Erlang cookie, config, data, log and plugin files, all under one
temporary directory, and removes everything again in :meth:`LocalRabbitNode.close`.

When the process runs as root the node runs as the ``rabbitmq`` user (the Erlang VM and
RabbitMQ's own scripts expect an unprivileged owner of the data directory), so every directory
the node writes is handed to that user first.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import pika
import pika.exceptions

from fedmq.broker.topology import rabbitmq_conf_limits

logger = logging.getLogger(__name__)

# Where distributions put the real scripts when the PATH only has a wrapper (or nothing, for
# users without /usr/sbin on PATH).
_EXTRA_SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/lib/rabbitmq/bin", "/opt/rabbitmq/sbin")
# Debian's /usr/sbin/rabbitmq-server is a wrapper that redirects all output to
# /var/log/rabbitmq and switches user with `su`; the real script lives beside it.
_DEBIAN_WRAPPER = "rabbitmq-script-wrapper"
# RabbitMQ's CLI picks its own distribution port in [dist_port + 10000, dist_port + 10010].
_CLI_DIST_PORT_OFFSET = 10010
_MAX_DIST_PORT = 65535 - _CLI_DIST_PORT_OFFSET
# What rabbitmq-server prints on stdout once a boot is complete ("Starting broker... completed
# with 3 plugins."), and how long after the AMQP port opened the node may take to print it
# before the harness asks `rabbitmqctl await_startup` instead.
_BOOT_COMPLETED = b" completed with "
_BANNER_GRACE_S = 15.0

#: the private node's administrator (not a site, not guest): RabbitMQ creates ``default_user``
#: instead of ``guest`` on first boot, so no private node ever has a guest account.
NODE_ADMIN_USER = "fedmq-node-admin"
GUEST_USER = "guest"

# Variables that would make our node or our rabbitmqctl calls talk to another node, or read
# another node's files, if they leaked in from the caller's environment.
_LEAKY_ENV_PREFIXES = ("RABBITMQ_", "ERL_")
_LEAKY_ENV_NAMES = frozenset(
    {"NODENAME", "NODE_PORT", "NODE_IP_ADDRESS", "CONFIG_FILE", "MNESIA_BASE", "LOG_BASE", "CONF_ENV_FILE"}
)


class BrokerHarnessError(RuntimeError):
    """Base class of every error raised by the broker test harness."""


class LocalNodeError(BrokerHarnessError):
    """The private node could not be started, stopped or controlled."""


@dataclass(frozen=True)
class RabbitInstall:
    """Paths of a local RabbitMQ installation's scripts."""

    server: Path
    ctl: Path


def find_rabbitmq_install() -> RabbitInstall | None:
    """Locate the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts, or return None.

    Looks on PATH and in the usual sbin directories, and sees through Debian's wrapper so the
    node's output stays ours instead of going to /var/log/rabbitmq.
    """
    search_path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_SEARCH_DIRS])
    found = shutil.which("rabbitmq-server", path=search_path)
    if found is None:
        return None
    resolved = Path(found).resolve()
    bin_dir = resolved.parent if resolved.name == _DEBIAN_WRAPPER else Path(found).parent
    server = bin_dir / "rabbitmq-server"
    ctl = bin_dir / "rabbitmqctl"
    if not (os.access(server, os.X_OK) and os.access(ctl, os.X_OK)):
        logger.warning("found %s but no executable rabbitmq-server/rabbitmqctl in %s", found, bin_dir)
        return None
    return RabbitInstall(server=server, ctl=ctl)


def free_port(host: str = "127.0.0.1", *, below: int = 65535) -> int:
    """Ask the kernel for a currently free TCP port on ``host`` (strictly below ``below``)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port < below:
            return port
    raise LocalNodeError(f"could not find a free TCP port below {below} on {host}")


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port`` (half a second to answer)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:]


class LocalRabbitNode:
    """One private RabbitMQ node on 127.0.0.1, owned by this process.

    Use it as a context manager, or call :meth:`start` and (always) :meth:`close`. The node keeps
    its name, ports and data across :meth:`restart`, so URLs handed out before a restart remain
    valid afterwards, and durable queues and persistent messages survive it.

    Args:
        data_dir: where the node keeps its database (``mnesia``); a fresh temporary directory
            when None. A directory the caller chose is left in place by :meth:`close`. It must be
            writable by the user the node runs as (``rabbitmq`` when running as root).
        management_port: enable ``rabbitmq_management`` on this 127.0.0.1 port when given.
        extra_config: further ``rabbitmq.conf`` lines (for example TLS listeners).
        username, password: the node's administrator, created on first boot with full rights on
            ``/`` (:data:`NODE_ADMIN_USER` and a random password by default; with a caller-chosen
            ``data_dir`` the password is kept in ``<data_dir>/node-admin.password``, 0600, so a
            restarted node accepts it). RabbitMQ then never creates ``guest``.
        start_timeout: seconds :meth:`start` waits for the node to become usable.
        install: the RabbitMQ scripts to use; found with :func:`find_rabbitmq_install` when None.
        cookie: the Erlang cookie; a random one when None. Nodes meant to form a cluster
            (the test kit's ``tests/testkit/cluster.py``) share one.
        epmd_port: the epmd port; a free one when None. Clustered nodes must share one epmd to
            find each other.
        amqp_port: the AMQP port; a free one when None. A pilot that runs the node for good
            gives a fixed one (``fedmq broker local --port 5672``) so its URLs stay valid.
        node_name: the Erlang node name; random when None. A kept ``data_dir`` needs the same
            name at every start (the database lives under the node name).
    """

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        management_port: int | None = None,
        extra_config: Sequence[str] = (),
        username: str | None = None,
        password: str | None = None,
        start_timeout: float = 90.0,
        install: RabbitInstall | None = None,
        cookie: str | None = None,
        epmd_port: int | None = None,
        amqp_port: int | None = None,
        node_name: str | None = None,
    ) -> None:
        resolved = install or find_rabbitmq_install()
        if resolved is None:
            raise LocalNodeError(
                "rabbitmq-server was not found (looked on PATH and in "
                f"{', '.join(_EXTRA_SEARCH_DIRS)}); install it, e.g. `apt-get install rabbitmq-server`"
            )
        self._install = resolved
        self.host = "127.0.0.1"
        self.username = username or NODE_ADMIN_USER
        if self.username == GUEST_USER:
            raise LocalNodeError("the private node never runs with 'guest': pick another administrator name")
        self.management_port = management_port
        self.start_timeout = start_timeout
        self._extra_config = list(extra_config)
        self.node_name = node_name or f"fedmq-test-{secrets.token_hex(4)}@localhost"
        if amqp_port is not None and port_open(self.host, amqp_port):
            raise LocalNodeError(f"port {amqp_port} on {self.host} is already in use (another broker?)")
        self.amqp_port = amqp_port if amqp_port is not None else free_port(self.host)
        self.dist_port = free_port(self.host, below=_MAX_DIST_PORT)
        self.epmd_port = epmd_port if epmd_port is not None else free_port(self.host)
        self._cookie = cookie
        self._run_as = self._pick_user()
        self._root = Path(tempfile.mkdtemp(prefix="fedmq-rabbit-"))
        self._owns_data_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else self._root / "data"
        self.password = password or self._admin_password()
        self._process: subprocess.Popen[bytes] | None = None
        self._stdout_log = self._root / "log" / "node-stdout.log"
        self._closed = False
        self.last_start_seconds: float | None = None
        try:
            self._write_files()
        except BaseException:
            shutil.rmtree(self._root, ignore_errors=True)
            raise

    # ----------------------------------------------------------------------------- layout
    def _admin_password(self) -> str:
        """A random password; kept beside a caller-owned data dir so restarts can log in."""
        if self._owns_data_dir:
            return secrets.token_urlsafe(24)
        path = self.data_dir / "node-admin.password"
        if path.is_file():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
        return secret

    @staticmethod
    def _pick_user() -> pwd.struct_passwd | None:
        """The account to run the node as: ``rabbitmq`` when we are root, else ourselves."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("rabbitmq")
        except KeyError:
            raise LocalNodeError(
                "running as root but there is no 'rabbitmq' user to run the private node as; "
                "install the rabbitmq-server package or run the tests as an unprivileged user"
            ) from None

    def _write_files(self) -> None:
        for sub in ("etc", "log", "home", "plugins-expand"):
            (self._root / sub).mkdir(parents=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self._root / "etc" / "rabbitmq-env.conf").write_text("# intentionally empty: see broker/local_node.py\n")
        (self._root / "etc" / "rabbitmq.conf").write_text(self._config_text())
        plugins = "[rabbitmq_management]." if self.management_port is not None else "[]."
        (self._root / "etc" / "enabled_plugins").write_text(plugins + "\n")
        cookie = self._root / "home" / ".erlang.cookie"
        cookie.write_text(self._cookie or "".join(secrets.choice(string.ascii_uppercase) for _ in range(32)))
        cookie.chmod(0o400)
        self._root.chmod(0o700)
        if self._run_as is not None:
            uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
            for path in (self._root, self.data_dir):
                os.chown(path, uid, gid)
                for dirpath, dirnames, filenames in os.walk(path):
                    for name in (*dirnames, *filenames):
                        os.chown(os.path.join(dirpath, name), uid, gid)

    def _config_text(self) -> str:
        lines = [
            f"listeners.tcp.1 = {self.host}:{self.amqp_port}",
            f"default_user = {self.username}",
            f"default_pass = {self.password}",
            "default_permissions.configure = .*",
            "default_permissions.read = .*",
            "default_permissions.write = .*",
            *rabbitmq_conf_limits(),
            "log.console = false",
            "log.file.level = info",
        ]
        if self.management_port is not None:
            lines += [f"management.tcp.port = {self.management_port}", f"management.tcp.ip = {self.host}"]
        lines += self._extra_config
        return "\n".join(lines) + "\n"

    def _env(self) -> dict[str, str]:
        """Environment for both the node and rabbitmqctl: nothing inherited may redirect them."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(_LEAKY_ENV_PREFIXES) and k not in _LEAKY_ENV_NAMES
        }
        etc = self._root / "etc"
        env.update(
            HOME=str(self._root / "home"),
            ERL_EPMD_ADDRESS=self.host,
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_CONF_ENV_FILE=str(etc / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(etc / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(etc / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(etc / "enabled_plugins"),
            RABBITMQ_NODENAME=self.node_name,
            RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.data_dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self._root / "log"),
            RABBITMQ_PID_FILE=str(self._root / "rabbitmq.pid"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(self._root / "plugins-expand"),
        )
        return env

    def _popen_user_kwargs(self) -> dict[str, object]:
        if self._run_as is None:
            return {}
        return {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}

    def accepting_connections(self) -> bool:
        """Whether the node's AMQP listener accepts TCP connections now (the fault driver times
        a broker restart from this moment)."""
        return port_open(self.host, self.amqp_port)

    # ----------------------------------------------------------------------------- URLs
    @property
    def amqp_url(self) -> str:
        """URL of the default vhost ``/`` for the default user."""
        return self.url_for_vhost("/")

    def url_for_vhost(self, vhost: str, *, username: str | None = None, password: str | None = None) -> str:
        """AMQP URL for ``vhost`` (percent-encoded, so names with ``/`` work)."""
        user = quote(username if username is not None else self.username, safe="")
        secret = quote(password if password is not None else self.password, safe="")
        return f"amqp://{user}:{secret}@{self.host}:{self.amqp_port}/{quote(vhost, safe='')}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> float:
        """Start the node and wait until it accepts AMQP logins; returns the seconds it took."""
        if self._closed:
            raise LocalNodeError("this LocalRabbitNode was closed; create a new one")
        if self.running:
            return 0.0
        started = time.monotonic()
        deadline = started + self.start_timeout
        logger.info("starting private RabbitMQ node %s on %s:%d", self.node_name, self.host, self.amqp_port)
        # a restart appends to the same file: only what this start writes counts as its banner
        boot_log_offset = self._stdout_log.stat().st_size if self._stdout_log.exists() else 0
        with open(self._stdout_log, "ab") as out:
            self._process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [str(self._install.server)],
                env=self._env(),
                cwd=str(self._root),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._popen_user_kwargs(),  # type: ignore[arg-type]
            )
        try:
            self._wait_ready(deadline, boot_log_offset)
        except BaseException:
            self._kill()
            raise
        self.last_start_seconds = time.monotonic() - started
        logger.info("node %s ready in %.2fs", self.node_name, self.last_start_seconds)
        return self.last_start_seconds

    def _boot_completed(self, offset: int) -> bool:
        """Whether this start's banner says the boot finished (``Starting broker... completed
        with N plugins.``, written after every plugin and the client listeners started)."""
        try:
            with open(self._stdout_log, "rb") as log:
                log.seek(offset)
                return _BOOT_COMPLETED in log.read()
        except OSError:
            return False

    def _wait_ready(self, deadline: float, boot_log_offset: int = 0) -> None:
        # Cheap polling of the listener first: rabbitmqctl costs a VM start per call.
        while not port_open(self.host, self.amqp_port):
            self._check_alive()
            if time.monotonic() > deadline:
                self._fail(f"AMQP port {self.amqp_port} did not open within {self.start_timeout:.0f}s")
            time.sleep(0.1)
        # RabbitMQ opens its client listeners last (after the plugins, management included) and
        # prints the banner's "completed" line right after, when the boot is over: the same moment
        # `rabbitmqctl await_startup` waits for, read from the node's own output instead of
        # starting an Erlang VM for it (about a second of CPU on every node start and restart).
        # A RabbitMQ that prints no such line gets `await_startup` after a grace period.
        banner_deadline = min(deadline, time.monotonic() + _BANNER_GRACE_S)
        while not self._boot_completed(boot_log_offset):
            self._check_alive()
            if time.monotonic() > banner_deadline:
                remaining = max(5, int(deadline - time.monotonic()))
                self.rabbitmqctl("await_startup", "--timeout", str(remaining), timeout=remaining + 15)
                break
            time.sleep(0.05)
        while True:
            try:
                params = pika.URLParameters(self.amqp_url)
                params.socket_timeout = 5
                params.blocked_connection_timeout = 5
                pika.BlockingConnection(params).close()
                return
            except pika.exceptions.AMQPError as exc:
                self._check_alive()
                if time.monotonic() > deadline:
                    self._fail(f"AMQP login to {self.host}:{self.amqp_port} kept failing: {exc!r}")
                time.sleep(0.3)

    def _check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            self._fail(f"rabbitmq-server exited early with status {self._process.returncode}")

    def _fail(self, reason: str) -> None:
        logs = [self._stdout_log, *sorted((self._root / "log").glob("*.log"))]
        details = "\n".join(f"--- {p.name} ---\n{_tail(p)}" for p in dict.fromkeys(logs) if p.exists())
        raise LocalNodeError(f"private RabbitMQ node {self.node_name}: {reason}\n{details}")

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the node gracefully (data stays), falling back to signals if it will not go."""
        proc = self._process
        if proc is None:
            return
        if proc.poll() is None:
            try:
                self.rabbitmqctl("shutdown", "--timeout", str(int(timeout)), timeout=timeout + 15)
            except (LocalNodeError, subprocess.TimeoutExpired) as exc:
                logger.warning("graceful shutdown of %s failed, signalling it: %s", self.node_name, exc)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("node %s ignored shutdown; killing it", self.node_name)
        self._kill()

    def _kill(self, *, orderly: bool = True) -> None:
        """Terminate the node's whole process group (script, VM and helpers) and reap it:
        SIGTERM first when ``orderly`` (rabbitmq-server stops the node in order), then SIGKILL."""
        proc = self._process
        if proc is None:
            return
        signals = ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)) if orderly else ((signal.SIGKILL, 10.0),)
        for sig, wait in signals:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                if sig is signal.SIGTERM:
                    # The VM may have outlived the script; make sure the group is empty.
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.error("node process %d did not exit", proc.pid)
        self._process = None

    def restart(self) -> float:
        """Stop and start the node with the same name, ports and data; returns the start time."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the node, its private epmd, and delete its files; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._owns_data_dir:
                # Everything the node wrote is deleted below: nothing to stop in order, so no
                # `rabbitmqctl shutdown` (an Erlang VM start, about a second of CPU) and no wait
                # for an orderly stop (seconds with plugins), just SIGKILL to its process group.
                self._kill(orderly=False)
            else:
                self.stop()
        except Exception:  # cleanup must go on whatever went wrong
            logger.exception("stopping %s failed", self.node_name)
            self._kill()
        finally:
            self._stop_epmd()
            shutil.rmtree(self._root, ignore_errors=True)
            if not self._owns_data_dir:
                logger.info("left caller-owned data dir %s in place", self.data_dir)

    def _stop_epmd(self) -> None:
        epmd = shutil.which("epmd") or shutil.which("epmd", path="/usr/lib/erlang/bin")
        if epmd is None:
            return
        env = {**self._env(), "ERL_EPMD_PORT": str(self.epmd_port)}

        def epmd_says(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(  # noqa: S603
                [epmd, "-port", str(self.epmd_port), *args], env=env, capture_output=True, text=True, timeout=15,
                check=False,
            )

        # epmd refuses -kill while a node is registered; a SIGKILLed VM is unregistered only once
        # epmd has seen its connection close, so wait (briefly) for our own name to go. Other
        # names (a cluster's nodes share one epmd) stay: the last node's close stops it.
        own = f"name {self.node_name.split('@', 1)[0]} "
        for _ in range(50):
            result = epmd_says("-kill")
            if "living nodes" not in result.stdout + result.stderr or own not in epmd_says("-names").stdout:
                break
            time.sleep(0.1)
        # "Killed" on success; a refusal to connect means none was running: both are fine.
        if result.returncode != 0 and "Cannot connect" not in result.stdout + result.stderr:
            logger.warning("epmd on port %d: %s%s", self.epmd_port, result.stdout, result.stderr)

    def __enter__(self) -> LocalRabbitNode:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------------- control
    def ctl_environment(self) -> dict[str, str]:
        """What an operator's ``rabbitmqctl`` needs to reach this node: the HOME holding its Erlang
        cookie and the epmd port and address (``fedmq broker local`` prints it)."""
        return {"HOME": str(self._root / "home"), "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": self.host}

    def ctl_command_line(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.ctl_environment().items())
        return f"{env} {self._install.ctl} -n {self.node_name} status"

    def rabbitmqctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n <this node> <args>`` and return its stdout.

        Raises :class:`LocalNodeError` with the command's stderr when it exits non-zero.
        """
        argv = [str(self._install.ctl), "-n", self.node_name, "-q", *args]
        result = subprocess.run(  # noqa: S603
            argv,
            env=self._env(),
            cwd=str(self._root),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **self._popen_user_kwargs(),  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            raise LocalNodeError(
                f"rabbitmqctl {' '.join(args)} failed with status {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout

    def add_vhost(self, name: str) -> None:
        self.rabbitmqctl("add_vhost", name)

    def delete_vhost(self, name: str) -> None:
        self.rabbitmqctl("delete_vhost", name)

    def add_user(self, user: str, password: str, tags: Iterable[str] = ()) -> None:
        """Create ``user``; ``tags`` such as ``administrator`` or ``management`` are set too."""
        self.rabbitmqctl("add_user", user, password)
        tag_list = list(tags)
        if tag_list:
            self.rabbitmqctl("set_user_tags", user, *tag_list)

    def set_permissions(
        self, vhost: str, user: str, configure: str = ".*", write: str = ".*", read: str = ".*"
    ) -> None:
        self.rabbitmqctl("set_permissions", "-p", vhost, user, configure, write, read)

    def list_vhosts(self) -> list[str]:
        out = self.rabbitmqctl("list_vhosts", "--no-table-headers")
        return [line.strip() for line in out.splitlines() if line.strip()]
