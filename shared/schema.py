"""Every message that crosses the broker, as strict pydantic models with a schema version.

One module so that a field is defined once; ``shared.codec`` turns these into msgpack bytes
and back. Models forbid unknown fields and coerce nothing: a peer running another schema is
refused with a specific error instead of being half-understood.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from fedmq.shared.sharding import block_shard

SCHEMA_VERSION = 1

SiteId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
UpdateId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
Fingerprint = Annotated[str, Field(min_length=8, max_length=80)]
BlockIndex = Annotated[int, Field(ge=0, lt=1 << 24)]
Version = Annotated[int, Field(ge=0)]
ShardIndex = Annotated[int, Field(ge=0, lt=1024)]
ShardCount = Annotated[int, Field(ge=1, le=1024)]

#: additive shard fields: omitted from the encoding while they hold their defaults, so a
#: single-shard federation's messages (and their signatures) are byte-for-byte what they were.
_SHARD_DEFAULTS = {"shard_index": 0, "shard_count": 1}


def _omit_default_shard(data: dict) -> dict:
    for key, default in _SHARD_DEFAULTS.items():
        if key in data and data[key] == default and type(data[key]) is int:
            del data[key]
    return data


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    schema_version: Literal[1] = SCHEMA_VERSION


class EncryptedBlock(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    index: BlockIndex
    ciphertext: Annotated[bytes, Field(min_length=1)]


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be finite")
    return value


class ChunkedMessage(WireModel):
    chunk_index: Annotated[int, Field(ge=0)]
    chunk_count: Annotated[int, Field(ge=1, le=100_000)]
    block_size: Annotated[int, Field(ge=1, le=1 << 16)]
    total_blocks: Annotated[int, Field(ge=1, le=1 << 24)]
    #: every block index of the whole message (all chunks), sorted; lets a receiver tell a
    #: complete set from one with a chunk missing or altered.
    block_indices: tuple[BlockIndex, ...]
    blocks: tuple[EncryptedBlock, ...]
    key_fingerprint: Fingerprint
    layout_fingerprint: Fingerprint
    #: aggregator shard this message belongs to: shard i of n owns the blocks b with
    #: ``b * n // total_blocks == i`` (docs/sharding.md). Defaults = one shard.
    shard_index: ShardIndex = 0
    shard_count: ShardCount = 1

    @model_serializer(mode="wrap")
    def _serialize(self, handler):  # type: ignore[no-untyped-def]
        return _omit_default_shard(handler(self))

    @model_validator(mode="after")
    def _consistent(self) -> "ChunkedMessage":
        if self.chunk_index >= self.chunk_count:
            raise ValueError("chunk_index must be < chunk_count")
        if self.shard_index >= self.shard_count:
            raise ValueError("shard_index must be < shard_count")
        if self.shard_count > 1:
            n, total = self.shard_count, self.total_blocks
            if any(block_shard(b, total, n) != self.shard_index for b in self.block_indices):
                raise ValueError("block_indices outside the shard's block range")
        if list(self.block_indices) != sorted(set(self.block_indices)):
            raise ValueError("block_indices must be sorted and unique")
        if self.block_indices and self.block_indices[-1] >= self.total_blocks:
            raise ValueError("block index beyond total_blocks")
        return self


class UpdateChunk(ChunkedMessage):
    """One piece of a site's encrypted, sparsified model update."""

    kind: Literal["update-chunk"] = "update-chunk"
    site_id: SiteId
    update_id: UpdateId
    #: per-site counter, strictly increasing; a retried publish reuses it (idempotency).
    seq: Annotated[int, Field(ge=1)]
    base_version: Version
    sample_weight: Annotated[float, Field(gt=0, le=1e9)]
    sparsity_mode: Literal["dense", "topk"]
    sparsity_fraction: Annotated[float, Field(gt=0, le=1)]
    created_at: float
    signature: bytes = b""

    _check_weight = field_validator("sample_weight", "created_at")(_finite)


class Contributor(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    site_id: SiteId
    update_id: UpdateId
    base_version: Version
    staleness: Annotated[int, Field(ge=0)]
    weight_units: Annotated[int, Field(ge=1)]
    sample_weight: float


class GlobalVersionChunk(ChunkedMessage):
    """A new global model version, or a snapshot of one.

    The aggregator holds D_v, the encrypted sum of every weighted update it has folded; a
    key holder reconstructs the model as ``x_v = x_0 + value_scale * decrypt(D_v)`` where
    x_0 is the seeded initial model every party builds alike. A ``delta`` message carries
    the new D_v value of each block that changed in v; a ``snapshot`` every non-zero block.
    Sending block values rather than steps means every site, whichever path it took,
    ends with bit-identical weights.
    """

    kind: Literal["global-version"] = "global-version"
    version: Version
    mode: Literal["delta", "snapshot"]
    value_scale: float
    #: the snapshot's addressee when it answers one site's request; None for broadcasts.
    target_site: SiteId | None = None
    contributors: tuple[Contributor, ...] = ()
    weight_units_sum: Annotated[int, Field(ge=0)] = 0
    created_at: float
    #: issue 15/16 additions, kept apart from the fold fields above. ``audit``: the encoded,
    #: aggregator-signed ``AuditRecord``s a site needs to extend its chain to this version
    #: (a delta: the record of ``version``; a snapshot: the records since the requester's
    #: version, or the last one). ``signature``: the aggregator's hybrid signature of this
    #: chunk (shared.signing); sites refuse a chunk without one.
    audit: tuple[Annotated[bytes, Field(min_length=1, max_length=64 * 1024)], ...] = ()
    signature: bytes = b""

    _check_scale = field_validator("value_scale", "created_at")(_finite)


class SnapshotRequest(WireModel):
    kind: Literal["snapshot-request"] = "snapshot-request"
    site_id: SiteId
    have_version: Annotated[int, Field(ge=-1)]
    reason: Annotated[str, Field(max_length=200)]
    #: the aggregator shard whose snapshot is wanted (have_version is that shard's version)
    shard_index: ShardIndex = 0

    @model_serializer(mode="wrap")
    def _serialize(self, handler):  # type: ignore[no-untyped-def]
        return _omit_default_shard(handler(self))


#: the reason of the notice that answers a snapshot request while nothing has been folded yet:
#: every party holds x_0. A fresh site waits for an answer (this or a snapshot) before its first
#: round, so it never trains from x_0 when the federation is already past version 0.
NO_VERSION_YET = "no-version-yet"


class Rejection(WireModel):
    """Why an input was dead-lettered; also the body of notices sent back to a site."""

    kind: Literal["rejection"] = "rejection"
    reason: Annotated[str, Field(max_length=64)]
    detail: Annotated[str, Field(max_length=2000)]
    site_id: str | None = None
    update_id: str | None = None
    #: sequence-backwards notices: the last sequence number the aggregator accepted from the site
    last_seq: Annotated[int, Field(ge=0)] | None = None


class SiteMetrics(WireModel):
    """Plaintext aggregates a site publishes after evaluating a version: never per-case data."""

    kind: Literal["site-metrics"] = "site-metrics"
    site_id: SiteId
    version: Version
    auc: float | None
    n_val: Annotated[int, Field(ge=0)]
    epsilon_spent: Annotated[float, Field(ge=0)]
    epsilon_target: float | None
    updates_sent: Annotated[int, Field(ge=0)]
    timestamp: float
    #: set while the site has paused itself (diverged model, lost state): shown by ``fedmq status``
    alert: Annotated[str, Field(max_length=500)] | None = None


HexDigest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class AuditContribution(BaseModel):
    """One update folded into a version: who, which update, which ciphertext, with what weight."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    site_id: SiteId
    update_id: UpdateId
    #: sha256 over the update's (block index, ciphertext) pairs (fedmq.shared.audit.update_digest):
    #: the site computes the same digest from what it sent, so it can prove inclusion.
    ciphertext_digest: HexDigest
    base_version: Version
    staleness: Annotated[int, Field(ge=0)]
    weight_units: Annotated[int, Field(ge=1)]


class AuditEpsilon(BaseModel):
    """A site's privacy spend as it last reported it (its plaintext metrics message)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    site_id: SiteId
    epsilon_spent: Annotated[float, Field(ge=0)]
    epsilon_target: float | None = None
    #: the version the site had evaluated when it reported
    reported_at_version: Version


class AuditRecord(WireModel):
    """One link of the aggregator's hash-chained audit log: what went into ``version``.

    ``prev_hash`` is the sha256 of the previous record's full encoding (signature included),
    or ``shared.audit.GENESIS_HASH`` for version 1. Signed by the aggregator (shared.signing,
    domain ``audit-record``) over the encoding with an empty ``signature``.
    """

    kind: Literal["audit-record"] = "audit-record"
    version: Annotated[int, Field(ge=1)]
    shard_index: ShardIndex = 0
    prev_hash: HexDigest
    #: fingerprint of the aggregator's public key (fedmq.shared.signing.VerifyKey.fingerprint)
    signer: Annotated[str, Field(min_length=8, max_length=64)]
    contributions: tuple[AuditContribution, ...]
    epsilons: tuple[AuditEpsilon, ...] = ()
    weight_units_sum: Annotated[int, Field(ge=0)]
    created_at: float
    signature: bytes = b""

    _check_created = field_validator("created_at")(_finite)


Message = Union[UpdateChunk, GlobalVersionChunk, SnapshotRequest, Rejection, SiteMetrics]
MESSAGE_TYPES: dict[str, type[WireModel]] = {
    "update-chunk": UpdateChunk,
    "global-version": GlobalVersionChunk,
    "snapshot-request": SnapshotRequest,
    "rejection": Rejection,
    "site-metrics": SiteMetrics,
    "audit-record": AuditRecord,
}
