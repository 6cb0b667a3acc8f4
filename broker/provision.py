"""Least-privilege broker users for fedmq, computed from :mod:`fedmq.broker.topology`.

Roles and what RabbitMQ checks (https://www.rabbitmq.com/docs/access-control, "How Permissions
Work"):

==========================  ===========================  ==========================  ==================
operation                   configure                    write                       read
==========================  ===========================  ==========================  ==================
exchange.declare            exchange                     -                           -
queue.declare               queue                        DLX exchange (if x-dlx)     queue (if x-dlx)
queue.declare passive=true  -                            -                           -
queue.bind                  -                            queue                       exchange
basic.publish               -                            exchange                    -
basic.consume / basic.get   -                            -                           queue
queue.delete / purge        queue (delete)               -                           queue (purge)
==========================  ===========================  ==========================  ==================

exchange.bind (not used by fedmq) needs write on the destination exchange and read on the
source exchange. A site therefore gets **no read on any exchange and no configure at all**:
with read only on its own queue, no exchange can be the source of a binding it makes, so it
cannot copy the global fanout into the dead-letter, updates or control exchange (a durable
binding would outlive its connection and fill the broker's disk).

Who declares what:

- The **administrator** (``fedmq broker declare`` / ``fedmq broker local --provision`` /
  the definitions file) declares every exchange, the aggregator's queues and each site's queue
  with its bindings, before the services start.
- The **aggregator** re-declares the exchanges and its own queues idempotently (so it also
  needs write on :data:`~broker.topology.DEAD_LETTER_EXCHANGE`, which every fedmq queue names
  as its ``x-dead-letter-exchange``, and which it publishes refusal copies to).
- A **site** ``S`` only checks passively that ``site_queue(S)`` exists and consumes it, and
  publishes to the updates and control exchanges. It needs no write on the dead-letter
  exchange: the broker itself dead-letters from its queue. It has no read on the updates
  exchange or queue, so it cannot see other sites' ciphertexts.

Broker user names: a site's user is its site id (the aggregator checks the AMQP ``user_id``
property against the site id inside each update), the aggregator's user is
:data:`AGGREGATOR_USER`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fedmq.broker import topology

AGGREGATOR_USER = "fedmq-aggregator"
ADMIN_USER = "fedmq-admin"
DEFAULT_VHOST = "fedmq"
#: same rule as ``SiteSettings.site_id``; also keeps site ids safe inside queue names and regexes
SITE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
NOTHING = "^$"

#: runs ``rabbitmqctl <args>`` against the target node and returns stdout, raising on failure
#: (the test kit's ``Broker.rabbitmqctl`` and ``LocalRabbitNode.rabbitmqctl`` both fit)
CtlRunner = Callable[..., str]


class ProvisionError(RuntimeError):
    """Provisioning could not be completed (bad site id, broker refused, HTTP error)."""


@dataclass(frozen=True)
class Permissions:
    """One user's three permission regexes in one vhost."""

    configure: str
    write: str
    read: str

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.configure, self.write, self.read)


@dataclass(frozen=True)
class UserGrant:
    user: str
    password: str
    permissions: Permissions
    tags: tuple[str, ...] = ()
    role: str = "site"  # "site" | "aggregator" | "admin"


def any_of(names: Iterable[str]) -> str:
    """``^(?:a|b|c)$`` matching exactly the given names (escaped), or ``^$`` for none."""
    unique = sorted(dict.fromkeys(names))
    if not unique:
        return NOTHING
    return "^(?:" + "|".join(re.escape(n) for n in unique) + ")$"


def check_site_id(site_id: str) -> str:
    if not SITE_ID_PATTERN.fullmatch(site_id):
        raise ProvisionError(f"invalid site id {site_id!r}: must match {SITE_ID_PATTERN.pattern}")
    if site_id in {AGGREGATOR_USER, ADMIN_USER}:
        raise ProvisionError(f"site id {site_id!r} collides with a service user")
    return site_id


def aggregator_permissions(shards: int = 1) -> Permissions:
    """Declare all exchanges and its own queues; bind them; publish global/site-direct/DLX; consume."""
    queues = topology.aggregator_queue_specs(shards)
    own_queues = [q.name for q in queues]
    bound_from = [ex for q in queues for ex, _ in q.bindings]
    return Permissions(
        configure=any_of([*(e.name for e in topology.EXCHANGES), *own_queues]),
        # queue.bind needs write on the queue; publishing needs write on the exchange
        write=any_of([topology.GLOBAL_EXCHANGE, topology.SITE_DIRECT_EXCHANGE, topology.DEAD_LETTER_EXCHANGE, *own_queues]),
        # consuming needs read on the queue; queue.bind needs read on the source exchange
        read=any_of([*own_queues, *bound_from]),
    )


def site_permissions(site_id: str) -> Permissions:
    """Consume its own (admin-declared) queue; publish updates, snapshot requests and metrics.

    Nothing else: no configure (no declare, no delete), no write on its queue (no queue.bind)
    and read on no exchange (no exchange.bind: a binding needs read on its source).
    """
    spec = topology.site_queue_spec(check_site_id(site_id))
    return Permissions(
        configure=NOTHING,
        write=any_of([topology.UPDATES_EXCHANGE, topology.CONTROL_EXCHANGE]),
        read=any_of([spec.name]),
    )


def admin_permissions() -> Permissions:
    return Permissions(".*", ".*", ".*")


def generate_password(nbytes: int = 24) -> str:
    """URL-safe random password that never starts with '-': rabbitmqctl would read such a
    password as an option (status 64), about one provisioning in 64."""
    while True:
        password = secrets.token_urlsafe(nbytes)
        if not password.startswith("-"):
            return password


def load_or_create_password(password_dir: str | os.PathLike[str], user: str) -> str:
    """``DIR/<user>.password`` (mode 0600), created with a random password when missing."""
    directory = Path(password_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{user}.password"
    if path.exists():
        password = path.read_text().strip()
        if not password:
            raise ProvisionError(f"{path} is empty")
        return password
    password = generate_password()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    os.chmod(path, 0o600)
    return password


def plan(
    sites: Sequence[str],
    passwords: Callable[[str], str],
    *,
    shards: int = 1,
    include_admin: bool = False,
) -> list[UserGrant]:
    """Every user fedmq needs, with its permissions; ``passwords(user)`` supplies each password."""
    grants = [UserGrant(AGGREGATOR_USER, passwords(AGGREGATOR_USER), aggregator_permissions(shards), role="aggregator")]
    for site in dict.fromkeys(sites):
        grants.append(UserGrant(check_site_id(site), passwords(site), site_permissions(site), role="site"))
    if include_admin:
        grants.insert(0, UserGrant(ADMIN_USER, passwords(ADMIN_USER), admin_permissions(), ("administrator",), role="admin"))
    return grants


def amqp_url(user: str, password: str, vhost: str, host: str = "127.0.0.1", port: int = 5672, *, tls: bool = False) -> str:
    scheme = "amqps" if tls else "amqp"
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{quote(vhost, safe='')}"


# ------------------------------------------------------------------------------ rabbitmqctl
def _existing_users(ctl: CtlRunner) -> set[str]:
    out = ctl("list_users", "--no-table-headers")
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _existing_vhosts(ctl: CtlRunner) -> set[str]:
    out = ctl("list_vhosts", "--no-table-headers")
    return {line.strip() for line in out.splitlines() if line.strip()}


def apply_with_rabbitmqctl(ctl: CtlRunner, vhost: str, grants: Sequence[UserGrant]) -> None:
    """Create the vhost and users (or reset their passwords) and set exactly these permissions."""
    if vhost not in _existing_vhosts(ctl):
        ctl("add_vhost", vhost)
    users = _existing_users(ctl)
    for g in grants:
        if g.user in users:
            ctl("change_password", g.user, g.password)
        else:
            ctl("add_user", g.user, g.password)
        if g.tags or g.user in users:  # a new user has no tags; an existing one may have stale ones
            ctl("set_user_tags", g.user, *g.tags)
        ctl("set_permissions", "-p", vhost, g.user, *g.permissions.as_tuple())


# ------------------------------------------------------------------------------ HTTP API
def _http(base_url: str, method: str, path: str, auth: tuple[str, str], body: Any = None, cafile: str | None = None) -> Any:
    url = base_url.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    req.add_header("Content-Type", "application/json")
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:  # noqa: S310 - operator-given URL
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raise ProvisionError(f"{method} {path}: HTTP {exc.code} {exc.read().decode(errors='replace')}") from None
    except urllib.error.URLError as exc:
        raise ProvisionError(f"{method} {url}: {exc.reason}") from None
    return json.loads(raw) if raw else None


def apply_with_http(
    management_url: str, admin: tuple[str, str], vhost: str, grants: Sequence[UserGrant], *, cafile: str | None = None
) -> None:
    """The same as :func:`apply_with_rabbitmqctl` through the management plugin's HTTP API."""
    v = quote(vhost, safe="")
    _http(management_url, "PUT", f"/api/vhosts/{v}", admin, {}, cafile)
    for g in grants:
        u = quote(g.user, safe="")
        _http(management_url, "PUT", f"/api/users/{u}", admin, {"password": g.password, "tags": ",".join(g.tags)}, cafile)
        p = g.permissions
        _http(management_url, "PUT", f"/api/permissions/{v}/{u}", admin, {"configure": p.configure, "write": p.write, "read": p.read}, cafile)


def list_permissions_http(management_url: str, admin: tuple[str, str], vhost: str, *, cafile: str | None = None) -> dict[str, Permissions]:
    rows = _http(management_url, "GET", f"/api/vhosts/{quote(vhost, safe='')}/permissions", admin, None, cafile)
    return {r["user"]: Permissions(r["configure"], r["write"], r["read"]) for r in rows}


def parse_list_permissions(output: str) -> dict[str, Permissions]:
    """Parse ``rabbitmqctl -q list_permissions -p V --no-table-headers`` (tab separated)."""
    result: dict[str, Permissions] = {}
    for line in output.splitlines():
        parts = line.split("\t")
        if len(parts) >= 4:
            result[parts[0]] = Permissions(parts[1], parts[2], parts[3])
    return result


# ------------------------------------------------------------------------------ topology
def all_queue_specs(sites: Sequence[str] = (), shards: int = 1) -> tuple[topology.QueueSpec, ...]:
    """The aggregator's queues plus, pre-declared so no global version is missed, each site's."""
    return (*topology.aggregator_queue_specs(shards), *(topology.site_queue_spec(check_site_id(s)) for s in sites))


def declare_topology(channel: Any, sites: Sequence[str] = (), shards: int = 1) -> None:
    """Declare every exchange, the aggregator's queues and the given sites' queues (as admin)."""
    topology.declare(channel, topology.EXCHANGES, all_queue_specs(sites, shards))


__all__ = [
    "ADMIN_USER",
    "AGGREGATOR_USER",
    "DEFAULT_VHOST",
    "CtlRunner",
    "Permissions",
    "ProvisionError",
    "UserGrant",
    "admin_permissions",
    "aggregator_permissions",
    "all_queue_specs",
    "amqp_url",
    "any_of",
    "apply_with_http",
    "apply_with_rabbitmqctl",
    "declare_topology",
    "list_permissions_http",
    "load_or_create_password",
    "parse_list_permissions",
    "plan",
    "site_permissions",
]
