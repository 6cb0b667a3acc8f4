"""Opening AMQP connections, and the backoff every fedmq service reconnects with."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import pika
import pika.exceptions

from shared.errors import BrokerConnectionError


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


def parameters(url: str, heartbeat: int = 30, connection_name: str | None = None) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 300
    params.connection_attempts = 1
    if connection_name:
        params.client_properties = {"connection_name": connection_name}
    return params


def connect(url: str, *, attempts: int = 5, backoff: Backoff | None = None, heartbeat: int = 30, name: str | None = None) -> pika.BlockingConnection:
    """A blocking connection after at most ``attempts`` tries, else ``BrokerConnectionError``."""
    backoff = backoff or Backoff()
    last: Exception | None = None
    for _ in range(attempts):
        try:
            conn = pika.BlockingConnection(parameters(url, heartbeat, name))
            backoff.connected()
            return conn
        except pika.exceptions.ProbableAuthenticationError as exc:
            raise BrokerConnectionError(f"broker refused our credentials: {exc}") from None
        except pika.exceptions.AMQPConnectionError as exc:
            last = exc
            time.sleep(backoff.next_delay())
    raise BrokerConnectionError(f"broker unreachable after {attempts} attempts: {last!r}") from None


def username_of(url: str) -> str:
    return pika.URLParameters(url).credentials.username
