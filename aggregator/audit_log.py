"""The aggregator's side of the audit chain (fedmq.shared.audit): build, sign and store one record
per committed version, and hand out the records a version or snapshot message must carry.

Kept out of the engine so the engine only calls ``note_update`` when it folds, ``commit``
when it commits, and ``records_for_*`` when it publishes.

Crash safety: the record of version v is appended (fsync) before the checkpoint of v is
written, and nothing about v is published before that checkpoint. On start-up the chain is
cut back to the checkpoint's version: a record past it belongs to a commit that never
happened (the WAL replay then commits that version again, with a fresh record).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedmq.shared.audit import AuditChain, ChainFile, chain_file, record_hash, sign_record, update_digest
from fedmq.shared.codec import decode_update_chunk, encode
from fedmq.shared.errors import ConfigError
from fedmq.shared.schema import AuditContribution, AuditEpsilon, AuditRecord, Contributor
from fedmq.shared.signing import SigningKey, chunk_digest

logger = logging.getLogger(__name__)

#: records a targeted snapshot carries at most (a site further behind asks again)
MAX_RECORDS_PER_SNAPSHOT = 128
#: msgpack framing of one record inside the snapshot's list of records (bin header), rounded up
_RECORD_FRAMING = 8


class AggregatorAudit:
    def __init__(self, state_dir: Path, key: SigningKey, shard_index: int = 0, shard_count: int = 1) -> None:
        self.key = key
        self.file = ChainFile(chain_file(state_dir, shard_index, shard_count))
        self.chain = AuditChain(key.public_key(), shard_index)
        self.shard_index = shard_index
        self._digests: dict[str, str] = {}

    def recover(self, version: int) -> None:
        """Load the chain, cut it back to the checkpoint's version, and check it is whole."""
        kept = self.file.truncate_to(version)
        self.chain.extend(kept)
        if self.chain.head != version:
            raise ConfigError(
                f"audit chain {self.file.path} ends at version {self.chain.head} but the checkpoint is at "
                f"version {version}: the chain must cover every version (restore the chain file with the "
                f"state directory, or start a new federation)"
            )

    def note_update(self, update_id: str, wal_records: Iterable[Mapping[str, Any]]) -> None:
        """Digest of a folded update's ciphertexts, for its contribution line: from the chunk
        digests its signatures were verified against (kept in the WAL records as ``dg``)."""
        by_index = sorted(wal_records, key=lambda r: r["ci"])
        digests = [r.get("dg") or chunk_digest(decode_update_chunk(r["body"], max_bytes=len(r["body"]) + 1))
                   for r in by_index]
        self._digests[update_id] = update_digest(digests)

    def commit(self, version: int, contributors: Iterable[Contributor], sites: Mapping[str, Mapping[str, Any]]) -> AuditRecord:
        """Sign and durably append the record of ``version``."""
        contributions = tuple(
            AuditContribution(
                site_id=c.site_id, update_id=c.update_id, ciphertext_digest=self._digests.pop(c.update_id),
                base_version=c.base_version, staleness=c.staleness, weight_units=c.weight_units,
            )
            for c in contributors
        )
        epsilons = tuple(
            AuditEpsilon(
                site_id=site, epsilon_spent=float(info["epsilon_spent"]),
                epsilon_target=None if info.get("epsilon_target") is None else float(info["epsilon_target"]),
                reported_at_version=int(info.get("metrics_version") or 0),
            )
            for site, info in sorted(sites.items())
            if info.get("epsilon_spent") is not None
        )
        rec = sign_record(AuditRecord(
            version=version, shard_index=self.shard_index, prev_hash=self.chain.head_hash,
            signer=self.key.public_key().fingerprint, contributions=contributions, epsilons=epsilons,
            weight_units_sum=sum(c.weight_units for c in contributions), created_at=time.time(),
        ), self.key)
        self.file.append([rec])
        self.chain.extend([rec])
        logger.debug("audit record %d: %s", version, record_hash(rec)[:16])
        return rec

    def records_for_delta(self, version: int) -> tuple[bytes, ...]:
        rec = self.chain.record(version)
        return () if rec is None else (encode(rec),)

    def records_for_snapshot(self, version: int, since: int | None, budget: int) -> tuple[bytes, ...]:
        """The records after ``since`` (a requester's version) towards ``version``, oldest first,
        as many as fit ``budget`` bytes (at most MAX_RECORDS_PER_SNAPSHOT), and always the first:
        the engine sets ``budget`` to what the snapshot's largest block leaves of the message
        (``shared.chunking.header_room``). A site further behind extends its chain with them,
        refuses the snapshot (audit gap) and asks again from its new head. A broadcast (``since``
        None) carries the last record."""
        lo = version - 1 if since is None else max(0, since)
        out: list[bytes] = []
        for rec in self.chain.records[lo:version][:MAX_RECORDS_PER_SNAPSHOT]:
            data = encode(rec)
            cost = len(data) + _RECORD_FRAMING
            if out and budget - cost < 0:
                break
            out.append(data)
            budget -= cost
        return tuple(out)
