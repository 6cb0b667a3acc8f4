"""What a site checks before it lets a global version touch its model.

The aggregator's public key (``aggregator_public_key`` in the site's config) is the site's
trust anchor. Every global-version chunk must carry the aggregator's hybrid signature; a
version older than the one held is a rollback, the very message already applied again is a
replay; and every version must bring the audit records that extend the site's verified
chain up to it (shared.audit). Each refusal is a ``WireError`` whose detail names the
version, is logged by the caller and counted here (``fedmq_site_versions_refused_total``);
the site keeps its last good model because nothing is applied before these checks pass.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, start_http_server

from fedmq.shared.audit import AuditChain, AuditError, AuditGap, AuditMissing, ChainFile, chain_file, decode_record

__all__ = ["AuditGap", "SiteVersionMetrics", "VersionGuard"]
from fedmq.shared.errors import SignatureInvalid, WireError
from fedmq.shared.schema import AuditRecord, GlobalVersionChunk
from fedmq.shared.signing import VerifyKey, verify_version

logger = logging.getLogger(__name__)


class UnsignedVersion(SignatureInvalid):
    reason = "unsigned-version"


class ForgedVersion(SignatureInvalid):
    reason = "bad-version-signature"


class RolledBackVersion(WireError):
    reason = "rollback"


class ReplayedVersion(WireError):
    reason = "replayed-version"


class SiteVersionMetrics:
    """Refusals of global versions, by reason, on a private registry (one per agent)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.refused = Counter("fedmq_site_versions_refused_total", "global versions refused, by reason",
                               ["reason"], registry=self.registry)
        self.counts: dict[str, int] = {}

    def refuse(self, reason: str) -> None:
        self.refused.labels(reason=reason).inc()
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        if port:
            start_http_server(port, addr=host, registry=self.registry)


class VersionGuard:
    def __init__(self, key: VerifyKey, state_dir: str | Path, shard_count: int = 1) -> None:
        self.key = key
        self.files = [ChainFile(chain_file(state_dir, i, shard_count)) for i in range(shard_count)]
        self.chains = []
        for i, f in enumerate(self.files):
            chain = AuditChain(key, i, anchor_ok=True)
            chain.extend(f.read())  # a chain file that does not verify is refused at start-up
            self.chains.append(chain)
        #: digests of the signatures of chunks applied by this process (replay detection). After a
        #: restart a replay of the held version is merely "old" (ignored, not counted): nothing of
        #: it is applied either way; only the label differs.
        self._applied: deque[bytes] = deque(maxlen=4096)

    @staticmethod
    def refuse(exc: WireError) -> WireError:
        """The one exit of every refusal; the caller logs and counts it (SiteVersionMetrics)."""
        return exc

    def check_signature(self, chunk: GlobalVersionChunk) -> None:
        if not chunk.signature:
            raise self.refuse(UnsignedVersion(f"global version {chunk.version} ({chunk.mode}) is unsigned"))
        try:
            verify_version(chunk, self.key)
        except SignatureInvalid as exc:
            raise self.refuse(ForgedVersion(exc.detail)) from None

    def check_not_old(self, chunk: GlobalVersionChunk, held: int) -> bool:
        """True when the chunk is news. A version below the one held is a rollback; the very
        chunk already applied is a replay; another message of the held version (a snapshot
        after its delta, a restarted aggregator's snapshot) is merely old: False."""
        if chunk.version < held:
            raise self.refuse(RolledBackVersion(
                f"global version {chunk.version} ({chunk.mode}) is older than the version {held} held (rollback)"))
        if chunk.version == held:
            if self._digest(chunk) in self._applied:
                raise self.refuse(ReplayedVersion(
                    f"global version {chunk.version} ({chunk.mode}, chunk {chunk.chunk_index}) was already applied (replay)"))
            return False
        return True

    def check_audit(self, head: GlobalVersionChunk) -> list[AuditRecord]:
        """The new records that take this shard's chain to ``head.version``, all verified."""
        chain = self.chains[head.shard_index]
        try:
            records = [decode_record(b) for b in head.audit]
            new = chain.check(records)
        except AuditError as exc:
            raise self.refuse(type(exc)(f"global version {head.version} ({head.mode}): {exc.detail}")) from None
        reach = new[-1].version if new else chain.head
        if reach < head.version:
            if new:  # verified and linked: keep them, so the next snapshot continues from there
                self.files[head.shard_index].append(new)
                chain.extend(new)
            if not records:
                raise self.refuse(AuditMissing(f"global version {head.version} ({head.mode}) carries no audit record"))
            raise self.refuse(AuditGap(f"global version {head.version} ({head.mode}): its audit records reach "
                                       f"version {reach} only (chain held to {chain.head})"))
        return new

    def commit(self, head: GlobalVersionChunk, new: list[AuditRecord], chunks: tuple[GlobalVersionChunk, ...]) -> None:
        """After the checks, before the model is saved: the chain file first (chain >= model)."""
        self.files[head.shard_index].append(new)
        self.chains[head.shard_index].extend(new)
        self._applied.extend(self._digest(c) for c in chunks)

    @staticmethod
    def _digest(chunk: GlobalVersionChunk) -> bytes:
        return hashlib.sha256(chunk.signature).digest()
