"""Every refusal of an incoming message, with its reason: pure checks, no I/O, no state change.

Each refusal is a ``WireError`` whose ``reason`` is both the dead-letter header
(``x-fedmq-reason``) and the metric label (``fedmq_aggregator_rejected_total{reason}``): the
engine passes the exception's reason to both, so the two cannot diverge.

An update chunk goes through two stages, in this order:

1. ``check_chunk`` (``ChunkRules``): what the chunk says about itself against the federation's
   fixed facts: size and encoding, the broker identity, the update id, the pinned key and hybrid
   signature, CKKS key, model layout, block size, shard, every ciphertext's bytes. It reads no
   mutable state but the layout (fixed by the first accepted update), so it may run on another
   thread than the one that folds.
2. ``check_admission`` (``LedgerView``): the chunk against what the aggregator already holds:
   sequence, duplicates and replays, incomplete-update bounds, the admission policy (staleness,
   sync rounds, weights) and the ciphertext headroom. It returns a ``Drop`` for a broker
   redelivery of something already logged (acked silently, never dead-lettered).

Senders of control messages (snapshot requests, site metrics) are checked by ``check_sender``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fedmq.aggregator import seqguard
from fedmq.aggregator.he_guard import check_chunk_ciphertexts, check_headroom
from fedmq.aggregator.policy import Admission, Policy
from fedmq.aggregator.update_guard import PendingUpdate, check_pending_room, check_update_id
from fedmq.shared.ckks import LoadedContext
from fedmq.shared.chunking import header_of
from fedmq.shared.codec import decode_update_chunk
from fedmq.shared.errors import (
    DuplicateUpdate,
    IdentityMismatch,
    InconsistentChunk,
    KeyMismatch,
    LayoutMismatch,
    MissingChunk,
    ReplayedUpdate,
    UnknownSite,
    WireError,
)
from fedmq.shared.schema import UpdateChunk
from fedmq.shared.sharding import block_shard
from fedmq.shared.signing import verify_chunk

#: refusals the site itself is told about on its own queue (after its signature was verified):
#: each means every further round it trains is wasted, or its state was lost
NOTIFY_SITE = frozenset({seqguard.REASON, "layout-fingerprint", "key-fingerprint"})


class BlockSizeMismatch(WireError):
    reason = "block-size"


class WrongShard(WireError):
    reason = "wrong-shard"


class BadCiphertext(WireError):
    reason = "ciphertext"


@dataclass(frozen=True)
class ChunkRules:
    """The federation's fixed facts a chunk is checked against."""

    ctx: LoadedContext
    pinned: Mapping[str, Any]
    block_size: int
    shard_index: int
    shard_count: int
    max_message_bytes: int
    check_user_id: bool
    public_context: str  # for error messages: where the federation's key comes from
    layout_from_settings: bool  # for error messages: who fixed the layout


@dataclass(frozen=True)
class CheckedChunk:
    chunk: UpdateChunk
    digest: bytes  # SHA-512 of the signed payload, reused by the audit log
    nbytes: int


def check_sender(site_id: str, user_id: str | None, rules: ChunkRules) -> None:
    """A control message's sender: its broker identity and a pinned key."""
    if rules.check_user_id and user_id != site_id:
        raise IdentityMismatch(f"AMQP user_id {user_id!r} is not {site_id!r}")
    if site_id not in rules.pinned:
        raise UnknownSite(f"unknown site {site_id!r}")


def decode_chunk(body: bytes, rules: ChunkRules) -> UpdateChunk:
    return decode_update_chunk(body, max_bytes=rules.max_message_bytes)


def check_chunk(chunk: UpdateChunk, nbytes: int, user_id: str | None, rules: ChunkRules, *,
                layout_fp: str | None, total_blocks: int | None) -> CheckedChunk:
    """Stage 1 (see the module doc); ``chunk`` comes from ``decode_chunk``."""
    if rules.check_user_id and user_id != chunk.site_id:
        raise IdentityMismatch(f"AMQP user_id {user_id!r} is not the chunk's site {chunk.site_id!r}")
    check_update_id(chunk)  # the id names its site: duplicate sets are per (site, id)
    if chunk.site_id not in rules.pinned:
        raise UnknownSite(f"no pinned public key for site {chunk.site_id!r}")
    digest = verify_chunk(chunk, rules.pinned)
    check_layout(chunk, rules, layout_fp=layout_fp, total_blocks=total_blocks)
    if chunk.block_size != rules.block_size:
        raise BlockSizeMismatch(f"block_size {chunk.block_size} is not the preset's {rules.block_size} slots")
    if chunk.shard_count != rules.shard_count or chunk.shard_index != rules.shard_index:
        raise WrongShard(
            f"chunk for shard {chunk.shard_index} of {chunk.shard_count}; this is shard "
            f"{rules.shard_index} of {rules.shard_count}"
        )
    if rules.shard_count > 1:
        for b in chunk.block_indices:
            if block_shard(b, chunk.total_blocks, rules.shard_count) != rules.shard_index:
                raise WrongShard(f"block {b} belongs to another shard")
    check_chunk_ciphertexts(rules.ctx, chunk)  # each block's bytes; a reason per kind of damage
    return CheckedChunk(chunk, digest, nbytes)


def check_layout(chunk: UpdateChunk, rules: ChunkRules, *, layout_fp: str | None, total_blocks: int | None) -> None:
    """The CKKS key and model layout of the federation (the layout is fixed by the settings or
    the first accepted update; None: not fixed yet)."""
    if chunk.key_fingerprint != rules.ctx.fingerprint:
        raise KeyMismatch(f"CKKS key {chunk.key_fingerprint!r} of the update is not the federation's "
                          f"{rules.ctx.fingerprint!r} (public_context {rules.public_context}): site "
                          f"{chunk.site_id}'s secret_context comes from another `fedmq keys init`")
    if layout_fp is not None and chunk.layout_fingerprint != layout_fp:
        raise LayoutMismatch(
            f"model layout {chunk.layout_fingerprint!r} of the update is not the federation's {layout_fp!r} "
            f"(fixed by {'the layout_fingerprint setting' if rules.layout_from_settings else 'the first accepted update'}): "
            f"site {chunk.site_id} runs another model_preset or init_seed"
        )
    if total_blocks is not None and chunk.total_blocks != total_blocks:
        raise LayoutMismatch(f"total_blocks {chunk.total_blocks} is not {total_blocks}")


class PendingView(PendingUpdate, Protocol):
    """What stage 2 reads of one incomplete (logged, not yet folded) update."""

    chunk_indices: set[int]
    header: dict[str, Any]
    admission: Admission


class LedgerView(Protocol):
    """What stage 2 reads of the aggregator's bookkeeping (the engine provides it)."""

    version: int
    pending: Mapping[str, PendingView]
    site_seq: Mapping[str, int]
    expired: Collection[str]

    def is_folded(self, update_id: str) -> bool: ...
    def last_header(self, site_id: str) -> str | None: ...
    def buffered_units(self) -> Iterable[int]: ...


@dataclass(frozen=True)
class Drop:
    """A broker redelivery of something already logged: ack it, log nothing, refuse nothing."""

    why: str


@dataclass(frozen=True)
class Limits:
    max_pending_updates: int
    max_pending_updates_per_site: int
    max_pending_bytes_per_site: int
    max_pending_bytes: int


def check_admission(chunk: UpdateChunk, nbytes: int, *, redelivered: bool, ledger: LedgerView, policy: Policy,
                    ctx: LoadedContext, limits: Limits) -> Admission | Drop:
    """Stage 2 (see the module doc): the update's admission (its first chunk's, for later ones)."""
    uid = chunk.update_id
    pend = ledger.pending.get(uid)
    if pend is None and not redelivered and chunk.site_id in ledger.site_seq:
        seqguard.check_sequence(
            chunk.site_id, chunk.seq, ledger.site_seq[chunk.site_id], seqguard.header_digest(header_of(chunk)),
            ledger.last_header(chunk.site_id),
        )
    if ledger.is_folded(uid):
        if redelivered:
            return Drop("update already folded")
        raise DuplicateUpdate(f"update {uid} was already folded")
    if pend is not None:
        if chunk.chunk_index in pend.chunk_indices:
            if redelivered:
                return Drop("chunk already in the WAL")
            raise DuplicateUpdate(f"chunk {chunk.chunk_index} of {uid} already received")
        if header_of(chunk) != pend.header:
            raise InconsistentChunk(f"{uid}: chunk {chunk.chunk_index} header differs from earlier chunks")
        admission = pend.admission
    else:
        # an update that expired incomplete folded nothing: the site may send it again in full
        last = ledger.site_seq.get(chunk.site_id, 0)
        if uid not in ledger.expired and chunk.seq <= last:
            if redelivered:
                return Drop("sequence number already consumed")
            raise ReplayedUpdate(f"{chunk.site_id} seq {chunk.seq} <= last accepted {last}")
        if len(ledger.pending) >= limits.max_pending_updates:
            raise MissingChunk(f"too many incomplete updates pending; refusing {uid}")
        admission = policy.admit(site_id=chunk.site_id, base_version=chunk.base_version,
                                 current_version=ledger.version, sample_weight=chunk.sample_weight)
        check_headroom(ctx, ledger.buffered_units(), admission.weight_units)
    if chunk.chunk_count > 1 and not (pend is not None and len(pend.chunk_indices) + 1 == chunk.chunk_count):
        check_pending_room(  # not for the chunk that completes an update: that frees memory
            ledger.pending, chunk, nbytes, max_updates_per_site=limits.max_pending_updates_per_site,
            max_bytes_per_site=limits.max_pending_bytes_per_site, max_bytes=limits.max_pending_bytes,
        )
    return admission
