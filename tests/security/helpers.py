"""Shared pieces of the security tests (kept out of conftest.py so tests can import them)."""

from __future__ import annotations

from dataclasses import dataclass

import pika

from fedmq.broker import provision
from testkit.broker import Namespace


@dataclass(frozen=True)
class ProvisionedVhost:
    """A vhost provisioned as for a real federation: the aggregator and two site users with
    fedmq's permissions, and their URLs (what the security tests attack)."""

    namespace: Namespace
    admin_url: str
    site_a: str
    site_b: str
    urls: dict[str, str]  # broker user -> AMQP URL in the module's vhost

    def url(self, user: str) -> str:
        return self.urls[user]

    @property
    def aggregator_url(self) -> str:
        return self.urls[provision.AGGREGATOR_USER]


def connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.socket_timeout = 10
    params.blocked_connection_timeout = 10
    return pika.BlockingConnection(params)
