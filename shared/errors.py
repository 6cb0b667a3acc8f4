"""One shallow error tree so callers can catch one thing per concern.

Wire errors carry a short machine-readable ``reason`` used as the dead-letter reason
header and the metrics label, so operators see the same word everywhere.
"""

from __future__ import annotations


class FedmqError(Exception):
    """Base class of every error fedmq raises on purpose."""


class ConfigError(FedmqError):
    """Settings or files on disk are inconsistent; fix the configuration."""


class BrokerConnectionError(FedmqError):
    """The broker could not be reached after the bounded retries."""


class CryptoError(FedmqError):
    """Key material is missing, of the wrong kind, or does not match."""


class SecretKeyPresentError(CryptoError):
    """A context that must be public (the aggregator's) holds a secret key."""


class WireError(FedmqError):
    """A message that must be refused; ``reason`` names the rule it broke."""

    reason: str = "invalid"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class MessageTooLarge(WireError):
    reason = "oversize"


class TruncatedMessage(WireError):
    reason = "truncated"


class MalformedMessage(WireError):
    reason = "malformed"


class UnknownMessageKind(WireError):
    reason = "unknown-kind"


class SchemaVersionMismatch(WireError):
    reason = "schema-version"


class SchemaViolation(WireError):
    reason = "schema"


class FingerprintMismatch(WireError):
    reason = "fingerprint"


class LayoutMismatch(FingerprintMismatch):
    reason = "layout-fingerprint"


class KeyMismatch(FingerprintMismatch):
    reason = "key-fingerprint"


class ChunkError(WireError):
    reason = "chunk"


class DuplicateChunk(ChunkError):
    reason = "duplicate-chunk"


class MissingChunk(ChunkError):
    reason = "incomplete"


class InconsistentChunk(ChunkError):
    reason = "inconsistent-chunk"


class SignatureInvalid(WireError):
    reason = "bad-signature"


class UnknownSite(WireError):
    reason = "unknown-site"


class IdentityMismatch(WireError):
    reason = "identity"


class ReplayedUpdate(WireError):
    reason = "replay"


class DuplicateUpdate(WireError):
    reason = "duplicate"


class FutureBaseVersion(WireError):
    reason = "future-version"


class TooStale(WireError):
    reason = "too-stale"


class ValueOutOfRange(WireError):
    reason = "value-range"
