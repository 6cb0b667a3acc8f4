"""What the engine asks to send: intents, never exchanges (``fedmq.aggregator.publisher`` routes them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal

from fedmq.broker.topology import DETAIL_HEADER, REASON_HEADER
from fedmq.shared.codec import encode, encode_rejection
from fedmq.shared.schema import GlobalVersionChunk, Rejection
from fedmq.shared.signing import SigningKey, sign_version


class Intent(enum.Enum):
    """Where an outgoing message should go, without naming broker objects: the service maps
    each intent onto topology names (``AggregatorService`` via ``aggregator.publisher.route``)."""

    VERSION_TO_ALL = "version-to-all"  # a global version for every site (the fanout)
    TO_SITE = "to-site"  # a snapshot or notice for one site's own queue (``site_id``)
    DEAD_LETTER = "dead-letter"  # a refusal record for the operators' dead-letter queue


@dataclass
class Outgoing:
    intent: Intent
    site_id: str | None
    body: bytes
    kind: Literal["delta", "snapshot", "dead-letter", "notice"]
    headers: dict[str, Any] | None = None


class VersionMessage(Outgoing):
    """A version chunk signed and encoded when it is published, not when it is committed: a
    ResNet-50-size version is ~290 MB of messages, which would otherwise sit in memory beside D
    until sent, and the signature (a SHA-512 of up to 4 MB, then Ed25519 + ML-DSA-65) is then
    computed on the connection thread while the engine folds on. The chunk holds the block
    bytes of its own commit, so a later commit cannot change what is signed."""

    def __init__(self, intent: Intent, site_id: str | None, chunk: GlobalVersionChunk,
                 kind: Literal["delta", "snapshot"], *, signing_key: SigningKey | None = None) -> None:
        self.intent, self.site_id, self.kind, self.headers = intent, site_id, kind, None
        self._chunk, self._signing_key = chunk, signing_key

    @property
    def chunk(self) -> GlobalVersionChunk:
        """The chunk, signed (on first use, once) when a signing key came with it."""
        if self._signing_key is not None:
            self._chunk, self._signing_key = sign_version(self._chunk, self._signing_key), None
        return self._chunk

    @property  # type: ignore[override]
    def body(self) -> bytes:
        return encode(self.chunk)


def dead_letter_notice(reason: str, detail: str, site: str | None, uid: str | None) -> Outgoing:
    """A refusal record for the dead-letter queue (an update refused after its chunks were acked)."""
    body = encode_rejection(Rejection(reason=reason, detail=detail[:2000], site_id=site, update_id=uid))
    return Outgoing(Intent.DEAD_LETTER, None, body, "dead-letter", {REASON_HEADER: reason, DETAIL_HEADER: detail[:2000]})


def site_notice(reason: str, detail: str, site: str, uid: str | None, last_seq: int) -> Outgoing:
    """A notice on the site's own queue (site-direct exchange), so the site itself learns of it."""
    body = encode_rejection(Rejection(reason=reason, detail=detail[:2000], site_id=site, update_id=uid,
                                      last_seq=last_seq))
    return Outgoing(Intent.TO_SITE, site, body, "notice", {REASON_HEADER: reason})
