"""The transport seam: the only interface fedmq services use to talk to the broker.

A service holds a ``Connect`` (a function that opens a :class:`Link`) and runs its connected
session inside :func:`run_reconnecting`, the one reconnect loop every service shares: capped
exponential backoff with full jitter that resets after a healthy period, and a fail-fast after
a few 403s in a row (a wrong password must reach systemd, not loop forever).

Two implementations of :class:`Link`:

- :class:`AmqpLink` (pika, blocking connection): the product. pika is imported in broker/ only;
  every pika error leaves this module as a :class:`~shared.errors.BrokerConnectionError`
  (or :class:`BrokerAuthenticationError` for a 403), so callers catch one fedmq error.
- :class:`StubLink` (in memory, routes by :mod:`broker.topology`'s exchanges and bindings): for
  fast tests that drive a real service without a broker (Dramatiq's ``StubBroker`` pattern).

Names never appear in callers as strings: publishing names an exchange and routing key from
:mod:`broker.topology`; the aggregator's engine names only *intents*
(``aggregator.engine.Intent``), which its service maps onto topology names.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedmq.broker import topology
from fedmq.broker.connection import AuthRefusals, Backoff, BrokerAuthenticationError
from fedmq.shared.codec import CONTENT_TYPE
from fedmq.shared.errors import BrokerConnectionError

logger = logging.getLogger(__name__)


class QueueMissing(BrokerConnectionError):
    """A queue a service only checks for (it has no right to declare it) does not exist."""


@dataclass
class Message:
    """One message to publish. ``user_id`` is the AMQP user the broker checks against the
    connection's login (sites set it; the broker refuses a forged one)."""

    exchange: str
    routing_key: str
    body: bytes
    kind: str | None = None
    content_type: str | None = CONTENT_TYPE
    headers: dict[str, Any] | None = None
    user_id: str | None = None
    persistent: bool = True
    mandatory: bool = False
    app_id: str | None = None
    timestamp: int | None = None
    #: other AMQP basic properties carried over (dead-letter copies keep the original's)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Delivery:
    """A received message, independent of the client library. ``properties`` holds the AMQP
    basic properties a dead-letter copy carries over (content type, message id, ...)."""

    body: bytes
    user_id: str | None
    redelivered: bool
    headers: dict[str, Any]
    properties: dict[str, Any]
    _ack: Callable[[], None]

    def ack(self) -> None:
        self._ack()


Handler = Callable[[Delivery], None]

#: how long an idle StubLink.process waits before it returns (the in-memory broker has no socket to wait on)
_STUB_IDLE_S = 0.002

#: basic properties a dead-letter copy keeps (user_id is not one: it names the sender, and the
#: broker would refuse it on our connection)
CARRIED_PROPERTIES = ("content_type", "content_encoding", "priority", "correlation_id", "reply_to", "message_id",
                      "timestamp", "type", "app_id")

_OTHER_PROPERTIES = ("content_encoding", "priority", "correlation_id", "reply_to", "message_id")


class Link(Protocol):
    """One live connection with a confirm-mode publishing channel and consumers."""

    def declare(self, exchanges: Iterable[topology.ExchangeSpec], queues: Iterable[topology.QueueSpec]) -> None: ...
    def check_declared(self, queues: Iterable[topology.QueueSpec]) -> None: ...
    def consume(self, queue: str, handler: Handler, prefetch: int) -> None: ...
    def publish(self, message: Message) -> None: ...
    def get(self, queue: str) -> Delivery | None: ...
    def process(self, time_limit: float) -> None: ...
    def call_threadsafe(self, fn: Callable[[], None]) -> None: ...
    @property
    def is_open(self) -> bool: ...
    def close(self) -> None: ...


Connect = Callable[[], Link]


# --------------------------------------------------------------------------- the reconnect loop


def run_reconnecting(
    session: Callable[[], None], *, stop: threading.Event, backoff: Backoff, auth: AuthRefusals, what: str,
    on_lost: Callable[[], None] | None = None, recoverable: tuple[type[BaseException], ...] = (BrokerConnectionError, OSError),
    fatal: tuple[type[BaseException], ...] = (),
) -> None:
    """Runs ``session`` until ``stop`` is set, reconnecting after each recoverable failure.

    ``session`` opens its link, calls ``backoff.connected()`` and ``auth.ok()`` once it consumes,
    and returns when ``stop`` is set. A 403 is retried (a restarting broker may refuse briefly)
    until :class:`AuthRefusals` gives up by raising :class:`BrokerAuthenticationError`. Anything
    not in ``recoverable``, or in ``fatal``, propagates: a service's fatal error is not a broker
    problem."""
    while not stop.is_set():
        try:
            session()
        except fatal:
            raise
        except BrokerAuthenticationError as exc:
            auth.refused(str(exc))  # raises after a few in a row: the service exits non-zero
            if stop.is_set():
                break
            delay = backoff.next_delay()
            logger.error("%s: broker refused our credentials; retrying in %.1fs: %s", what, delay, exc)
            stop.wait(delay)
        except recoverable as exc:
            if on_lost is not None:
                on_lost()
            if stop.is_set():
                break
            delay = backoff.next_delay()
            logger.warning("%s: broker connection lost (%s: %s); reconnecting in %.1fs", what, type(exc).__name__, exc, delay)
            stop.wait(delay)


# --------------------------------------------------------------------------- pika


def amqp_connect(url: str, *, name: str, heartbeat: int = 30, tls: object | None = None) -> Connect:
    """A ``Connect`` for the product: one attempt per call (the loop does the waiting); ``url``
    may list several cluster nodes, tried in order."""

    def open_link() -> AmqpLink:
        return AmqpLink.open(url, name=name, heartbeat=heartbeat, tls=tls)

    return open_link


def connect_link(url: str, *, attempts: int = 10, name: str | None = None) -> AmqpLink:
    """A link after at most ``attempts`` tries, for drivers that run once and have no reconnect
    loop of their own (an administrator declaring topology, a benchmark publishing, the fault
    driver draining a queue); services use :func:`run_reconnecting` instead."""
    from fedmq.broker.connection import connect

    return AmqpLink(connect(url, attempts=attempts, name=name))


class AmqpLink:
    """A pika ``BlockingConnection`` with one confirm-mode channel. Used from its own thread
    only, except :meth:`call_threadsafe`."""

    def __init__(self, conn: Any) -> None:
        import pika.exceptions

        self._errors = pika.exceptions
        self._conn = conn
        self._channel = conn.channel()
        self._channel.confirm_delivery()

    @classmethod
    def open(cls, url: str, *, name: str, heartbeat: int = 30, tls: object | None = None) -> AmqpLink:
        import pika
        import pika.exceptions

        from fedmq.broker.connection import AUTH_REFUSED, describe_refusal, parameters_list

        try:
            params = parameters_list(url, heartbeat, name, tls)
            conn = pika.BlockingConnection(params[0] if len(params) == 1 else params)
            return cls(conn)
        except AUTH_REFUSED as exc:
            raise BrokerAuthenticationError(describe_refusal(url, exc)) from None
        except pika.exceptions.AMQPError as exc:
            raise BrokerConnectionError(f"cannot connect: {exc!r}") from None

    def _translate(self, exc: BaseException) -> BrokerConnectionError:
        return BrokerConnectionError(f"{type(exc).__name__}: {exc}")

    def declare(self, exchanges: Iterable[topology.ExchangeSpec], queues: Iterable[topology.QueueSpec]) -> None:
        try:
            topology.declare(self._channel, tuple(exchanges), tuple(queues))
        except self._errors.AMQPError as exc:
            raise self._translate(exc) from None

    def check_declared(self, queues: Iterable[topology.QueueSpec]) -> None:
        try:
            topology.check_declared(self._channel, tuple(queues))
        except self._errors.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise QueueMissing(f"queue missing: {exc.reply_text}") from None
            raise self._translate(exc) from None
        except self._errors.AMQPError as exc:
            raise self._translate(exc) from None

    def consume(self, queue: str, handler: Handler, prefetch: int) -> None:
        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            tag = method.delivery_tag
            handler(Delivery(
                body=body, user_id=props.user_id, redelivered=bool(method.redelivered), headers=dict(props.headers or {}),
                properties={k: getattr(props, k, None) for k in CARRIED_PROPERTIES},
                _ack=lambda: self._guard(lambda: ch.basic_ack(tag)),
            ))

        def setup() -> None:
            self._channel.basic_qos(prefetch_count=prefetch)
            self._channel.basic_consume(queue, on_message)

        self._guard(setup)

    def consumer_count(self, queue: str) -> int:
        """How many consumers ``queue`` has (benchmarks wait for their shards with it)."""
        return int(self._guard(lambda: self._channel.queue_declare(queue, passive=True).method.consumer_count))

    def publish(self, message: Message) -> None:
        """Returns once the broker confirmed it (confirm mode); raises if it was refused."""
        import pika

        props = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent if message.persistent else pika.DeliveryMode.Transient,
            content_type=message.content_type, type=message.kind, headers=message.headers or None,
            user_id=message.user_id, app_id=message.app_id, timestamp=message.timestamp,
            **{k: v for k, v in message.extra.items() if k in _OTHER_PROPERTIES},
        )
        self._guard(lambda: self._channel.basic_publish(message.exchange, message.routing_key, message.body, props,
                                                        mandatory=message.mandatory))

    def get(self, queue: str) -> Delivery | None:
        """One message taken from ``queue`` (acknowledged on receipt), or None when it is empty."""
        method, props, body = self._guard(lambda: self._channel.basic_get(queue, auto_ack=True))
        if method is None:
            return None
        return Delivery(body=body, user_id=props.user_id, redelivered=bool(method.redelivered),
                        headers=dict(props.headers or {}),
                        properties={k: getattr(props, k, None) for k in CARRIED_PROPERTIES}, _ack=lambda: None)

    def process(self, time_limit: float) -> None:
        self._guard(lambda: self._conn.process_data_events(time_limit=time_limit))

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        self._guard(lambda: self._conn.add_callback_threadsafe(fn))

    @property
    def is_open(self) -> bool:
        return bool(self._conn.is_open)

    def close(self) -> None:
        try:
            if self._conn.is_open:
                self._conn.close()
        except Exception:  # closing a dead connection
            pass

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (self._errors.AMQPError, ConnectionError) as exc:
            raise self._translate(exc) from None


# --------------------------------------------------------------------------- in memory


class StubBroker:
    """An in-memory broker for fast tests: exchanges and queues from :mod:`fedmq.broker.topology`
    specs, direct/fanout routing, per-queue FIFO, acks, redelivery of unacked messages when a
    link closes, and a switch that drops every link (to exercise the reconnect loop)."""

    def __init__(self) -> None:
        self.exchanges: dict[str, str] = {}
        self.queues: dict[str, deque[tuple[Message, bool]]] = {}
        self.bindings: list[tuple[str, str, str]] = []  # (exchange, key, queue)
        self.unroutable: list[Message] = []
        self.links: list[StubLink] = []
        self.refuse_logins = False
        self.down = False
        self.lock = threading.RLock()

    def connect(self, user: str = "stub") -> Connect:
        def open_link() -> StubLink:
            with self.lock:
                if self.refuse_logins:
                    raise BrokerAuthenticationError(f"stub broker refused user {user!r}")
                if self.down:
                    raise BrokerConnectionError("stub broker is down")
                link = StubLink(self, user)
                self.links.append(link)
                return link

        return open_link

    def declare_all(self, exchanges: Iterable[topology.ExchangeSpec], queues: Iterable[topology.QueueSpec]) -> None:
        with self.lock:
            for ex in exchanges:
                self.exchanges[ex.name] = ex.type
            for q in queues:
                self.queues.setdefault(q.name, deque())
                for exchange, key in q.bindings:
                    if (exchange, key, q.name) not in self.bindings:
                        self.bindings.append((exchange, key, q.name))

    def route(self, message: Message) -> list[str]:
        with self.lock:
            kind = self.exchanges.get(message.exchange)
            if kind is None:
                raise BrokerConnectionError(f"NOT_FOUND: no exchange {message.exchange!r}")
            hits = [q for ex, key, q in self.bindings if ex == message.exchange and (kind == "fanout" or key == message.routing_key)]
            for q in hits:
                self.queues[q].append((message, False))
            if not hits:
                self.unroutable.append(message)
            return hits

    def drop_links(self) -> None:
        """Every open link fails on its next call, as after a broker restart."""
        with self.lock:
            for link in list(self.links):
                link.broken = True

    def messages(self, queue: str) -> list[Message]:
        with self.lock:
            return [m for m, _ in self.queues[queue]]


class StubLink:
    def __init__(self, broker: StubBroker, user: str) -> None:
        self.broker, self.user = broker, user
        self.consumers: list[tuple[str, Handler, int]] = []
        self.unacked: dict[int, tuple[str, Message]] = {}
        self.callbacks: deque[Callable[[], None]] = deque()
        self.broken = False
        self.closed = False
        self._tag = 0

    def _check(self) -> None:
        if self.broken or self.closed:
            raise BrokerConnectionError("stub link lost")

    def declare(self, exchanges: Iterable[topology.ExchangeSpec], queues: Iterable[topology.QueueSpec]) -> None:
        self._check()
        self.broker.declare_all(exchanges, queues)

    def check_declared(self, queues: Iterable[topology.QueueSpec]) -> None:
        self._check()
        for q in queues:
            if q.name not in self.broker.queues:
                raise QueueMissing(f"queue missing: {q.name}")

    def consume(self, queue: str, handler: Handler, prefetch: int) -> None:
        self._check()
        self.check_declared((topology.QueueSpec(queue),))
        self.consumers.append((queue, handler, prefetch))

    def publish(self, message: Message) -> None:
        self._check()
        if message.user_id is not None and message.user_id != self.user:
            raise BrokerConnectionError(f"PRECONDITION_FAILED: user_id {message.user_id!r} is not {self.user!r}")
        self.broker.route(message)

    def process(self, time_limit: float) -> None:
        self._check()
        busy = bool(self.callbacks)
        while self.callbacks:
            self.callbacks.popleft()()
        for queue, handler, prefetch in list(self.consumers):
            while sum(1 for q, _ in self.unacked.values() if q == queue) < prefetch:
                self._check()
                with self.broker.lock:
                    items = self.broker.queues[queue]
                    if not items:
                        break
                    message, redelivered = items.popleft()
                busy = True
                self._tag += 1
                tag = self._tag
                self.unacked[tag] = (queue, message)
                handler(Delivery(
                    body=message.body, user_id=message.user_id, redelivered=redelivered, headers=dict(message.headers or {}),
                    properties={"content_type": message.content_type, "type": message.kind, "app_id": message.app_id,
                                "timestamp": message.timestamp, **message.extra},
                    _ack=lambda tag=tag: self._ack(tag),
                ))
        if not busy and time_limit > 0:
            # nothing to do: give the other threads the interpreter, as pika's wait in select
            # does, instead of spinning (a spinning loop slowed a site's training thread 10x)
            time.sleep(min(time_limit, _STUB_IDLE_S))

    def get(self, queue: str) -> Delivery | None:
        self._check()
        with self.broker.lock:
            items = self.broker.queues[queue]
            if not items:
                return None
            message, redelivered = items.popleft()
        return Delivery(body=message.body, user_id=message.user_id, redelivered=redelivered,
                        headers=dict(message.headers or {}),
                        properties={"content_type": message.content_type, "type": message.kind,
                                    "app_id": message.app_id, "timestamp": message.timestamp, **message.extra},
                        _ack=lambda: None)

    def _ack(self, tag: int) -> None:
        self._check()
        self.unacked.pop(tag, None)

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        self._check()
        self.callbacks.append(fn)

    @property
    def is_open(self) -> bool:
        return not (self.broken or self.closed)

    def close(self) -> None:
        """Unacked messages go back to the head of their queues, marked redelivered."""
        if self.closed:
            return
        self.closed = True
        with self.broker.lock:
            for queue, message in reversed(list(self.unacked.values())):
                self.broker.queues[queue].appendleft((message, True))
            self.unacked.clear()
            if self in self.broker.links:
                self.broker.links.remove(self)
