"""Opening AMQP connections, and the backoff every fedmq service reconnects with."""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field

import pika
import pika.exceptions

from fedmq.shared.errors import BrokerConnectionError

#: pika's ways of saying "403": wrong user or password, or no access to the vhost
AUTH_REFUSED = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
    pika.exceptions.AuthenticationError,
)
#: consecutive refusals before a service gives up (a broker restarting may refuse briefly)
MAX_AUTH_REFUSALS = 3


class BrokerAuthenticationError(BrokerConnectionError):
    """The broker refused our credentials (403). Retrying forever would hide a wrong password
    from systemd, so services give up after ``MAX_AUTH_REFUSALS`` in a row (``AuthRefusals``)."""


def describe_refusal(url: str, exc: BaseException) -> str:
    params = pika.URLParameters(split_urls(url)[0])
    return (f"the broker at {params.host}:{params.port} refused user {params.credentials.username!r} on vhost "
            f"{params.virtual_host!r} (403: wrong user or password, or no permission on the vhost): "
            f"{type(exc).__name__}; check FEDMQ_AMQP_URL and `fedmq broker provision`")


@dataclass
class AuthRefusals:
    """Counts consecutive 403s; ``refused`` raises once there were ``limit`` in a row."""

    limit: int = MAX_AUTH_REFUSALS
    count: int = 0

    def refused(self, message: str) -> None:
        self.count += 1
        if self.count >= self.limit:
            raise BrokerAuthenticationError(f"giving up after {self.count} refusals in a row: {message}")

    def ok(self) -> None:
        self.count = 0


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter that resets after a healthy period."""

    initial_s: float = 0.5
    max_s: float = 30.0
    healthy_after_s: float = 60.0
    _attempt: int = 0
    _connected_at: float | None = field(default=None)

    def connected(self) -> None:
        self._connected_at = time.monotonic()

    def next_delay(self) -> float:
        if self._connected_at is not None and time.monotonic() - self._connected_at >= self.healthy_after_s:
            self._attempt = 0
        self._connected_at = None
        delay = min(self.max_s, self.initial_s * (2**self._attempt))
        self._attempt += 1
        return random.uniform(0, delay)


def parameters(url: str, heartbeat: int = 30, connection_name: str | None = None, tls: object | None = None) -> pika.URLParameters:
    """``tls``: any settings object with ``tls_ca``/``tls_cert``/``tls_key`` (used for amqps:// URLs)."""
    from fedmq.broker.tls import connection_parameters

    params = connection_parameters(url, tls)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 300
    params.connection_attempts = 1
    if connection_name:
        params.client_properties = {"connection_name": connection_name}
    return params


def split_urls(url: str) -> list[str]:
    """``url`` may list several brokers (the nodes of a cluster), separated by commas or spaces."""
    urls = [u for u in re.split(r"[,\s]+", url.strip()) if u]
    return urls or [url]


def parameters_list(url: str, heartbeat: int = 30, connection_name: str | None = None, tls: object | None = None) -> list[pika.URLParameters]:
    """Parameters for each URL in ``url``; pika tries them in order (``BlockingConnection([...])``)."""
    return [parameters(u, heartbeat, connection_name, tls) for u in split_urls(url)]


def connect(
    url: str, *, attempts: int = 5, backoff: Backoff | None = None, heartbeat: int = 30, name: str | None = None, tls: object | None = None
) -> pika.BlockingConnection:
    """A blocking connection after at most ``attempts`` tries, else ``BrokerConnectionError``.

    ``url`` may name several nodes of a cluster (comma/space separated): each attempt tries them
    in order and takes the first that answers. A single URL behaves exactly as before."""
    backoff = backoff or Backoff()
    last: Exception | None = None
    for _ in range(attempts):
        try:
            params = parameters_list(url, heartbeat, name, tls)
            conn = pika.BlockingConnection(params[0] if len(params) == 1 else params)
            backoff.connected()
            return conn
        except AUTH_REFUSED as exc:
            raise BrokerAuthenticationError(describe_refusal(url, exc)) from None
        except pika.exceptions.AMQPConnectionError as exc:
            last = exc
            time.sleep(backoff.next_delay())
    raise BrokerConnectionError(f"broker unreachable after {attempts} attempts: {last!r}") from None


def username_of(url: str) -> str:
    return pika.URLParameters(split_urls(url)[0]).credentials.username
