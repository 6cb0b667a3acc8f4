"""Fixtures for the broker security tests: fedmq's real users, provisioned once per module.

Provisioning goes through :func:`broker.provision.apply_with_rabbitmqctl` with the harness's
``rabbitmqctl`` (each call starts an Erlang VM, about a second), so it is done once per module
into a module-owned vhost; tests open their own connections and channels in it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pika
import pytest

from fedmq.broker import provision
from testkit.broker import Broker
from tests.security.helpers import ProvisionedVhost, connect


@pytest.fixture(scope="module")
def federation(broker: Broker) -> Iterator[ProvisionedVhost]:
    """Aggregator + two sites (unique ids) with least privilege; the admin declared the
    exchanges, the aggregator's queues and both sites' queues (sites cannot declare)."""
    if not broker.can_rabbitmqctl:
        pytest.skip(f"{broker!r} cannot be administered with rabbitmqctl")
    namespace = broker.new_namespace("security")
    token = secrets.token_hex(3)
    site_a, site_b = f"sec{token}_a", f"sec{token}_b"
    passwords = {}

    def password(user: str) -> str:
        return passwords.setdefault(user, provision.generate_password())

    grants = provision.plan([site_a, site_b], password)
    provision.apply_with_rabbitmqctl(broker.rabbitmqctl, namespace.vhost, grants)
    host_url = namespace.url
    urls = {}
    for g in grants:
        parsed = pika.URLParameters(host_url)
        urls[g.user] = provision.amqp_url(g.user, g.password, namespace.vhost, parsed.host, parsed.port)
    conn = connect(namespace.url)
    try:
        provision.declare_topology(conn.channel(), [site_a, site_b])
    finally:
        conn.close()
    try:
        yield ProvisionedVhost(namespace, namespace.url, site_a, site_b, urls)
    finally:
        broker.retire_namespace(namespace)
        broker.retire_users([site_a, site_b])


@pytest.fixture
def open_channel(federation: ProvisionedVhost) -> Iterator:
    """``open_channel(user, confirm=True)`` -> a fresh channel; connections closed afterwards."""
    connections: list[pika.BlockingConnection] = []

    def _open(user: str, confirm: bool = True):  # noqa: ANN202
        conn = connect(federation.url(user))
        connections.append(conn)
        ch = conn.channel()
        if confirm:
            ch.confirm_delivery()
        return ch

    yield _open
    for conn in connections:
        if conn.is_open:
            conn.close()
