"""The aggregator's state machine: validate, log, fold, commit. No broker I/O.

``accept(body, user_id=, redelivered=)`` validates one update chunk and, when it is good,
appends it to the write-ahead log (fsync) and returns a ``Decision``; the caller acks the
message (or dead-letters a refused one) and then calls ``apply(decision)``, which assembles
chunks and folds complete updates, committing a version every K folds. What must go out on
the broker comes back as ``Outgoing`` values naming an ``Intent`` (never an exchange); the
service maps intents onto topology names and publishes them.

Durable state (``state_dir``): ``checkpoint.msgpack`` (D_v and bookkeeping at the last
commit), ``wal-<version>.log`` (every accepted chunk since), ``status.json``. On start the
checkpoint is loaded and the WAL replayed with the weights recorded on arrival, so a crash
at any point folds each acknowledged update exactly once.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aggregator import checkpoint as cpmod
from aggregator import fold as foldmod
from aggregator import seqguard
from aggregator.audit_log import AggregatorAudit
from aggregator.metrics import AggregatorMetrics
from aggregator.policy import Admission, Policy
from aggregator.settings import AggregatorSettings
from aggregator.update_guard import check_pending_room, check_update_id
from aggregator.wal import WriteAheadLog, read_records, write_segment
from broker.topology import DETAIL_HEADER, REASON_HEADER
from shared.atomic import atomic_write_json
from shared.chunking import ChunkAssembler, chunk_blocks, header_of
from aggregator.blockstore import CiphertextStore
from aggregator.he_guard import check_chunk_ciphertexts, check_headroom
from shared.ckks import HeVector, LoadedContext, check_ciphertext, load_ciphertext, load_context
from shared.ckks_wire import CiphertextError
from shared.codec import decode_site_metrics, decode_snapshot_request, decode_update_chunk, encode, encode_rejection
from shared.errors import (
    ConfigError,
    CryptoError,
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
from shared.schema import NO_VERSION_YET, Contributor, EncryptedBlock, GlobalVersionChunk, Rejection, UpdateChunk
from shared.sharding import block_shard
from shared.signing import SigningKey, load_pinned_keys, load_private_key, sign_version, verify_chunk
from shared.statelock import lock_state_dir

logger = logging.getLogger(__name__)

STATUS_FILE = "status.json"
#: refusals the site itself is told about on its own queue (after its signature was verified):
#: each means every further round it trains is wasted, or its state was lost
NOTIFY_SITE = frozenset({seqguard.REASON, "layout-fingerprint", "key-fingerprint"})
CRASH_POINTS = ("after-wal", "before-ack", "after-fold", "after-checkpoint")


class BlockSizeMismatch(WireError):
    reason = "block-size"


class WrongShard(WireError):
    reason = "wrong-shard"


class BadCiphertext(WireError):
    reason = "ciphertext"


#: a test seam: called with one of CRASH_POINTS as execution passes it (never during WAL
#: replay). Nothing in fedmq sets one; tests inject a hook that kills the process there
#: (tests/launcher.py) to prove that every acknowledged update is folded exactly once.
CrashHook = Callable[[str], None]


class Intent(enum.Enum):
    """Where an outgoing message should go, without naming broker objects: the service maps
    each intent onto topology names (``AggregatorService`` via ``aggregator.consumer.route``)."""

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


class _VersionMessage(Outgoing):
    """A version chunk encoded when it is published, not when it is committed: a ResNet-50-size
    version is ~290 MB of messages, which would otherwise sit in memory beside D until sent. The
    chunk holds the block bytes of its own commit, so a later commit cannot change it."""

    def __init__(self, intent: Intent, site_id: str | None, chunk: GlobalVersionChunk,
                 kind: Literal["delta", "snapshot"]) -> None:
        self.intent, self.site_id, self.kind, self.headers = intent, site_id, kind, None
        self.chunk = chunk

    @property  # type: ignore[override]
    def body(self) -> bytes:
        return encode(self.chunk)


@dataclass
class Decision:
    action: Literal["accept", "reject", "drop"]
    reason: str = ""
    detail: str = ""
    site_id: str | None = None
    update_id: str | None = None
    chunk: UpdateChunk | None = None
    record: dict[str, Any] | None = None

    def dead_letter_headers(self) -> dict[str, Any]:
        return {REASON_HEADER: self.reason, DETAIL_HEADER: self.detail[:2000]}


@dataclass
class _Pending:
    site_id: str
    seq: int
    base_version: int
    sample_weight: float
    admission: Admission
    header: dict[str, Any]
    chunk_indices: set[int] = field(default_factory=set)
    records: list[dict[str, Any]] = field(default_factory=list)


def _drain(items: list[Any]) -> Any:
    """Yield a list's items first to last, dropping each from the list (its memory goes back as
    the fold proceeds, instead of after it)."""
    items.reverse()
    while items:
        yield items.pop()


def _segment_name(version: int) -> str:
    return f"wal-{version:06d}.log"


class AggregatorEngine:
    def __init__(
        self,
        settings: AggregatorSettings,
        *,
        context: LoadedContext | None = None,
        pinned: dict[str, Any] | None = None,
        metrics: AggregatorMetrics | None = None,
        crash_hook: CrashHook | None = None,
        signing_key: SigningKey | None = None,
    ) -> None:
        self.settings = s = settings
        self.ctx = context or load_context(s.public_context, require_secret=False)
        if self.ctx.is_private:
            raise CryptoError("the aggregator must not hold a secret key")
        self.pinned = pinned if pinned is not None else load_pinned_keys(s.site_keys_dir)
        self.metrics = metrics or AggregatorMetrics()
        self._crash_hook = crash_hook
        self.state_dir = Path(s.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # every version, snapshot and audit record goes out signed with the aggregator's own key
        self.signing_key = signing_key or load_private_key(s.signing_key)
        self._dir_lock = lock_state_dir(self.state_dir, "aggregator")  # one process per state dir
        try:
            self._init_state(s)
        except BaseException:
            self._dir_lock.release()
            raise

    def _init_state(self, s: AggregatorSettings) -> None:
        self.audit = AggregatorAudit(self.state_dir, self.signing_key, s.shard_index, s.shard_count)
        self.policy = Policy(
            mode=s.mode, buffer_size=s.buffer_size, staleness_exponent=s.staleness_exponent,
            max_staleness=s.max_staleness, weight_quantum=s.weight_quantum,
            reference_sample_weight=s.reference_sample_weight, sites=frozenset(self.pinned),
        )
        if s.mode == "sync" and not self.pinned:
            raise ConfigError("sync mode needs pinned site keys (K = number of sites)")
        self.K = self.policy.commit_after
        self.value_scale = foldmod.value_scale(s.server_lr, s.weight_quantum, self.K)
        self.block_size = self.ctx.block_size

        self.version = 0
        self._D_bytes: dict[int, bytes] = {}
        self.D = CiphertextStore(self.ctx, self._D_bytes)  # D_v as wire bytes only
        self.buffer: dict[int, HeVector] = {}
        self.contributors: list[Contributor] = []
        self.buffer_ids: list[str] = []
        self.round_sites: set[str] = set()
        self.pending: dict[str, _Pending] = {}
        self.assembler: ChunkAssembler[UpdateChunk] = ChunkAssembler(
            lambda c: c.update_id, max_pending=s.max_pending_updates, max_pending_bytes=s.max_pending_bytes
        )
        self.site_seq: dict[str, int] = {}
        self.recent: deque[tuple[int, list[str]]] = deque(maxlen=s.remember_versions)
        self._known: set[str] = set()
        self.expired: deque[str] = deque(maxlen=4096)
        self.sites: dict[str, dict[str, Any]] = {}
        self.layout_fp = s.layout_fingerprint
        self.total_blocks: int | None = None
        self.duplicates_dropped = 0
        self.updates_folded_total = 0
        self.startup_outgoing: list[Outgoing] = []
        self._replaying = False
        self._log_once: set[str] = set()

        self._recover()

    # ------------------------------------------------------------------ config / recovery

    def _config(self) -> dict[str, Any]:
        s = self.settings
        return {
            "mode": s.mode, "weight_quantum": s.weight_quantum, "buffer_size": self.K,
            "server_lr": s.server_lr, "value_scale": self.value_scale,
            "key_fingerprint": self.ctx.fingerprint, "layout_fingerprint": self.layout_fp,
            "total_blocks": self.total_blocks, "block_size": self.block_size,
            "shard_index": s.shard_index, "shard_count": s.shard_count,
            "staleness_exponent": s.staleness_exponent, "reference_sample_weight": s.reference_sample_weight,
        }

    def _recover(self) -> None:
        cp = cpmod.load(self.state_dir)
        if cp is None:
            self.segment = _segment_name(0)
            write_segment(self.state_dir / self.segment, [])
            self._write_checkpoint()
        else:
            cpmod.check_config(cp.config, self._config())
            self.version = cp.version
            self.layout_fp = cp.config.get("layout_fingerprint") or self.layout_fp
            self.total_blocks = cp.config.get("total_blocks")
            for index, data in cp.blocks.items():
                check_ciphertext(self.ctx, data)
                self._D_bytes[index] = data
            self.site_seq = dict(cp.site_seq)
            for v, ids in cp.recent:
                self.recent.append((v, list(ids)))
                self._known.update(ids)
            self.sites = {k: dict(v) for k, v in cp.sites.items()}
            for site, info in self.sites.items():
                if info.get("sample_weight") is not None:
                    self.policy.note_reported(site, float(info["sample_weight"]))
            self.segment = cp.wal_segment
        self.audit.recover(self.version)  # the chain, cut back to the checkpoint (audit_log.py)
        records, _, torn = read_records(self.state_dir / self.segment)
        if torn:
            logger.warning("WAL %s ends in a torn record (crash during a write); ignoring it", self.segment)
        self._replaying = True
        try:
            for i, rec in enumerate(records):
                self._replay_record(rec, records[i + 1 :])
        finally:
            self._replaying = False
        # drop segments the checkpoint does not reference (left by a crash mid-commit)
        for p in self.state_dir.glob("wal-*.log*"):
            if p.name != self.segment:
                p.unlink(missing_ok=True)
        self.wal = WriteAheadLog(self.state_dir / self.segment)
        self._update_gauges()
        if records:
            logger.info("replayed %d WAL records; version %d, buffer %d/%d, %d incomplete",
                        len(records), self.version, len(self.buffer_ids), self.K, len(self.pending))
        self.startup_outgoing.extend(self.snapshot())
        self.write_status()

    def _replay_record(self, rec: dict[str, Any], later: list[dict[str, Any]]) -> None:
        if rec.get("t") == "expire":
            self._expire_update(rec["uid"], log=False)
            return
        if rec.get("t") != "chunk":
            return
        chunk = decode_update_chunk(rec["body"], max_bytes=len(rec["body"]) + 1)
        self._register(chunk, Admission(rec["st"], rec["u"]), rec)
        self.startup_outgoing.extend(self._apply_chunk(chunk, len(rec["body"]), carry=later))

    def crash(self, point: str) -> None:
        """The injected crash hook's seam (see :data:`CrashHook`); a no-op without one."""
        if self._crash_hook is not None and not self._replaying:
            self._crash_hook(point)

    # ------------------------------------------------------------------ accept

    def _refuse(self, exc: WireError, chunk: UpdateChunk | None = None) -> Decision:
        site = chunk.site_id if chunk else None
        first = self.metrics.reject(exc.reason)
        if site in self.sites or (site and site in self.pinned):
            info = self.sites.setdefault(site, {})
            rej = info.setdefault("rejected", {})
            rej[exc.reason] = rej.get(exc.reason, 0) + 1
        log = logger.warning if first else logger.debug
        log("refused chunk: %s: %s", exc.reason, exc.detail, extra={"reason": exc.reason, "site": site})
        return Decision("reject", exc.reason, exc.detail, site, chunk.update_id if chunk else None, chunk)

    def _drop(self, chunk: UpdateChunk, why: str) -> Decision:
        self.duplicates_dropped += 1
        self.metrics.duplicates_dropped.inc()
        logger.debug("dropping redelivered chunk %s/%d: %s", chunk.update_id, chunk.chunk_index, why)
        return Decision("drop", "duplicate", why, chunk.site_id, chunk.update_id, chunk)

    def accept(self, body: bytes, *, user_id: str | None = None, redelivered: bool = False) -> Decision:
        """Validate one update chunk; WAL it (fsync) when good. Ack after this returns."""
        self.metrics.bytes_in.inc(len(body))
        chunk: UpdateChunk | None = None
        try:
            chunk = decode_update_chunk(body, max_bytes=self.settings.max_message_bytes)
            if self.settings.check_user_id and user_id != chunk.site_id:
                raise IdentityMismatch(f"AMQP user_id {user_id!r} is not the chunk's site {chunk.site_id!r}")
            check_update_id(chunk)  # the id names its site: duplicate sets below are per (site, id)
            if chunk.site_id not in self.pinned:
                raise UnknownSite(f"no pinned public key for site {chunk.site_id!r}")
            digest = verify_chunk(chunk, self.pinned)  # SHA-512 of the signed payload, reused by the audit log
            if chunk.key_fingerprint != self.ctx.fingerprint:
                raise KeyMismatch(f"CKKS key {chunk.key_fingerprint!r} of the update is not the federation's "
                                  f"{self.ctx.fingerprint!r} (public_context {self.settings.public_context}): site "
                                  f"{chunk.site_id}'s secret_context comes from another `fedmq keys init`")
            if self.layout_fp is not None and chunk.layout_fingerprint != self.layout_fp:
                raise LayoutMismatch(
                    f"model layout {chunk.layout_fingerprint!r} of the update is not the federation's {self.layout_fp!r} "
                    f"(fixed by {'the layout_fingerprint setting' if self.settings.layout_fingerprint else 'the first accepted update'}): "
                    f"site {chunk.site_id} runs another model_preset or init_seed"
                )
            if self.total_blocks is not None and chunk.total_blocks != self.total_blocks:
                raise LayoutMismatch(f"total_blocks {chunk.total_blocks} is not {self.total_blocks}")
            if chunk.block_size != self.block_size:
                raise BlockSizeMismatch(f"block_size {chunk.block_size} is not the preset's {self.block_size} slots")
            if chunk.shard_count != self.settings.shard_count or chunk.shard_index != self.settings.shard_index:
                raise WrongShard(
                    f"chunk for shard {chunk.shard_index} of {chunk.shard_count}; this is shard "
                    f"{self.settings.shard_index} of {self.settings.shard_count}"
                )
            if self.settings.shard_count > 1:
                for b in chunk.block_indices:
                    if block_shard(b, chunk.total_blocks, self.settings.shard_count) != self.settings.shard_index:
                        raise WrongShard(f"block {b} belongs to another shard")
            check_chunk_ciphertexts(self.ctx, chunk)  # each block's bytes; a reason per kind of damage
            uid = chunk.update_id
            pend = self.pending.get(uid)
            if pend is None and not redelivered and chunk.site_id in self.site_seq:
                seqguard.check_sequence(
                    chunk.site_id, chunk.seq, self.site_seq[chunk.site_id], seqguard.header_digest(header_of(chunk)),
                    self.sites.get(chunk.site_id, {}).get("last_header"),
                )
            if uid in self._known or uid in self.buffer_ids:
                if redelivered:
                    return self._drop(chunk, "update already folded")
                raise DuplicateUpdate(f"update {uid} was already folded")
            if pend is not None:
                if chunk.chunk_index in pend.chunk_indices:
                    if redelivered:
                        return self._drop(chunk, "chunk already in the WAL")
                    raise DuplicateUpdate(f"chunk {chunk.chunk_index} of {uid} already received")
                if header_of(chunk) != pend.header:
                    raise InconsistentChunk(f"{uid}: chunk {chunk.chunk_index} header differs from earlier chunks")
                admission = pend.admission
            else:
                # an update that expired incomplete folded nothing: the site may send it again in full
                if uid not in self.expired and chunk.seq <= self.site_seq.get(chunk.site_id, 0):
                    if redelivered:
                        return self._drop(chunk, "sequence number already consumed")
                    raise ReplayedUpdate(
                        f"{chunk.site_id} seq {chunk.seq} <= last accepted {self.site_seq.get(chunk.site_id, 0)}"
                    )
                if len(self.pending) >= self.settings.max_pending_updates:
                    raise MissingChunk(f"too many incomplete updates pending; refusing {uid}")
                admission = self.policy.admit(
                    site_id=chunk.site_id, base_version=chunk.base_version, current_version=self.version,
                    sample_weight=chunk.sample_weight, round_sites=self.round_sites,
                )
                check_headroom(self.ctx, [c.weight_units for c in self.contributors]
                               + [p.admission.weight_units for p in self.pending.values()], admission.weight_units)
            if chunk.chunk_count > 1 and not (pend is not None and len(pend.chunk_indices) + 1 == chunk.chunk_count):
                check_pending_room(  # not for the chunk that completes an update: that frees memory
                    self.pending, chunk, len(body), max_updates_per_site=self.settings.max_pending_updates_per_site,
                    max_bytes_per_site=self.settings.max_pending_bytes_per_site, max_bytes=self.settings.max_pending_bytes,
                )
        except WireError as exc:
            if isinstance(exc, seqguard.SequenceBackwards) and chunk is not None:
                seqguard.record(self.sites, chunk.site_id, chunk.seq, self.site_seq.get(chunk.site_id, 0))
                logger.error("sequence went backwards: %s", exc.detail, extra={"site": chunk.site_id})
            return self._refuse(exc, chunk)
        record = {
            "t": "chunk", "body": bytes(body), "uid": chunk.update_id, "ci": chunk.chunk_index,
            "st": admission.staleness, "u": admission.weight_units, "user": user_id,
            "redelivered": bool(redelivered), "at": time.time(), "dg": digest,
        }
        self.wal.append(record)
        self.crash("after-wal")
        self._register(chunk, admission, record)
        return Decision("accept", "", "", chunk.site_id, chunk.update_id, chunk, record)

    def _register(self, chunk: UpdateChunk, admission: Admission, record: dict[str, Any]) -> None:
        uid = chunk.update_id
        pend = self.pending.get(uid)
        if pend is None:
            pend = self.pending[uid] = _Pending(
                chunk.site_id, chunk.seq, chunk.base_version, chunk.sample_weight, admission, header_of(chunk)
            )
            self.site_seq[chunk.site_id] = max(chunk.seq, self.site_seq.get(chunk.site_id, 0))
            self.policy.note_reported(chunk.site_id, chunk.sample_weight)
            info = self.sites.setdefault(chunk.site_id, {})
            info["sample_weight"] = float(chunk.sample_weight)
            if chunk.seq >= self.site_seq.get(chunk.site_id, 0):
                info["last_header"] = seqguard.header_digest(header_of(chunk))
                seqguard.clear_if_resumed(info, chunk.seq)
            if self.settings.mode == "sync":
                self.round_sites.add(chunk.site_id)
            if self.layout_fp is None:
                self.layout_fp = chunk.layout_fingerprint
            if self.total_blocks is None:
                self.total_blocks = chunk.total_blocks
        pend.chunk_indices.add(chunk.chunk_index)
        pend.records.append(record)

    # ------------------------------------------------------------------ apply / fold / commit

    def apply(self, decision: Decision) -> list[Outgoing]:
        """Assemble and fold after the ack; returns what to publish (versions, notices)."""
        if decision.action == "reject" and decision.reason in NOTIFY_SITE and decision.site_id in self.pinned:
            return [self._site_notice(decision.reason, decision.detail, decision.site_id, decision.update_id)]
        if decision.action != "accept" or decision.chunk is None or decision.record is None:
            return []
        return self._apply_chunk(decision.chunk, len(decision.record["body"]), carry=[])

    def handle_chunk(self, body: bytes, *, user_id: str | None = None, redelivered: bool = False) -> tuple[Decision, list[Outgoing]]:
        """accept + apply in one call (unit tests, tools)."""
        d = self.accept(body, user_id=user_id, redelivered=redelivered)
        return d, self.apply(d)

    def _apply_chunk(self, chunk: UpdateChunk, nbytes: int, carry: list[dict[str, Any]]) -> list[Outgoing]:
        uid = chunk.update_id
        try:
            assembled = self.assembler.add(chunk, nbytes)
        except WireError as exc:
            return self._drop_pending(uid, exc)
        if assembled is None:
            return []
        pend = self.pending[uid]
        t0 = time.perf_counter()
        try:
            vectors = [(b.index, self._load(b)) for b in assembled.blocks]
        except WireError as exc:
            return self._drop_pending(uid, exc)
        del assembled
        self.audit.note_update(uid, pend.records)
        pend.records.clear()  # folded now: its chunk bytes are no longer needed in memory
        foldmod.fold_into(self.buffer, _drain(vectors), pend.admission.weight_units)
        self.metrics.fold_seconds.observe(time.perf_counter() - t0)
        self.metrics.updates_folded.inc()
        self.updates_folded_total += 1
        del self.pending[uid]
        self.buffer_ids.append(uid)
        self.contributors.append(Contributor(
            site_id=pend.site_id, update_id=uid, base_version=pend.base_version,
            staleness=pend.admission.staleness, weight_units=pend.admission.weight_units,
            sample_weight=float(pend.sample_weight),
        ))
        info = self.sites.setdefault(pend.site_id, {})
        info.update(last_update_id=uid, last_update_at=time.time(), last_staleness=pend.admission.staleness,
                    last_weight_units=pend.admission.weight_units, last_base_version=pend.base_version,
                    updates_folded=int(info.get("updates_folded", 0)) + 1)
        self._update_gauges()
        self.crash("after-fold")
        if self.policy.commit_due(len(self.buffer_ids), self.round_sites):
            return self._commit(carry)
        return []

    def _load(self, block: EncryptedBlock) -> HeVector:
        try:
            return load_ciphertext(self.ctx, block.ciphertext)
        except CiphertextError as exc:  # keeps its own reason (ciphertext-corrupt, -key, ...)
            exc.detail = f"block {block.index}: {exc.detail}"
            raise
        except CryptoError as exc:
            raise BadCiphertext(f"block {block.index}: {exc}") from None

    def _drop_pending(self, uid: str, exc: WireError) -> list[Outgoing]:
        """An update that cannot be folded after its chunks were acked: forget it, dead-letter a notice."""
        pend = self.pending.pop(uid, None)
        self.assembler.discard(uid)
        if pend is not None and self.settings.mode == "sync":
            self.round_sites.discard(pend.site_id)
        if self._replaying:
            return []
        self.metrics.reject(exc.reason)
        logger.warning("update %s dropped: %s: %s", uid, exc.reason, exc.detail)
        return [self._notice(exc.reason, exc.detail, pend.site_id if pend else None, uid)]

    def _notice(self, reason: str, detail: str, site: str | None, uid: str | None) -> Outgoing:
        body = encode_rejection(Rejection(reason=reason, detail=detail[:2000], site_id=site, update_id=uid))
        return Outgoing(Intent.DEAD_LETTER, None, body, "dead-letter", {REASON_HEADER: reason, DETAIL_HEADER: detail[:2000]})

    def _site_notice(self, reason: str, detail: str, site: str, uid: str | None) -> Outgoing:
        """A notice on the site's own queue (site-direct exchange), so the site itself learns of it."""
        body = encode_rejection(Rejection(reason=reason, detail=detail[:2000], site_id=site, update_id=uid,
                                          last_seq=self.site_seq.get(site, 0)))
        return Outgoing(Intent.TO_SITE, site, body, "notice", {REASON_HEADER: reason})

    def _commit(self, carry: list[dict[str, Any]]) -> list[Outgoing]:
        changed = foldmod.commit(self.D, self.buffer)  # the store serializes each changed block
        self.version += 1
        contributors, ids = tuple(self.contributors), list(self.buffer_ids)
        if len(self.recent) == self.recent.maxlen:
            _, old = self.recent[0]
            self._known.difference_update(old)
        self.recent.append((self.version, ids))
        self._known.update(ids)
        self.contributors, self.buffer_ids = [], []
        self.round_sites = {p.site_id for p in self.pending.values()} if self.settings.mode == "sync" else set()
        # new segment = the records of still-incomplete updates + (during replay) the records after this one
        old_segment, self.segment = self.segment, _segment_name(self.version)
        carried = [r for p in self.pending.values() for r in p.records] + list(carry)
        write_segment(self.state_dir / self.segment, carried)
        self.audit.commit(self.version, contributors, self.sites)  # before the checkpoint (audit_log.py)
        self._write_checkpoint()
        self.crash("after-checkpoint")
        if not self._replaying:
            self.wal.close()
            self.wal = WriteAheadLog(self.state_dir / self.segment)
        if old_segment != self.segment:
            (self.state_dir / old_segment).unlink(missing_ok=True)
        self._update_gauges()
        logger.info("version %d committed: %d updates, %d blocks changed", self.version, len(ids), len(changed),
                    extra={"version": self.version})
        out = self._version_messages("delta", changed, contributors=contributors,
                                     audit=self.audit.records_for_delta(self.version))
        if self.settings.snapshot_every and self.version % self.settings.snapshot_every == 0:
            out += self.snapshot()
        if not self._replaying:
            self.write_status()
        return out

    def _write_checkpoint(self) -> None:
        cp = cpmod.Checkpoint(
            version=self.version, value_scale=self.value_scale, config=self._config(),
            blocks=dict(self._D_bytes), site_seq=dict(self.site_seq),
            recent=[(v, list(ids)) for v, ids in self.recent], sites=self.sites, wal_segment=self.segment,
        )
        cpmod.save(self.state_dir, cp)

    # ------------------------------------------------------------------ outgoing versions

    def _version_messages(
        self, mode: Literal["delta", "snapshot"], indices: list[int], *,
        contributors: tuple[Contributor, ...] = (), target_site: str | None = None, audit: tuple[bytes, ...] = (),
    ) -> list[Outgoing]:
        if self.layout_fp is None or self.total_blocks is None:
            return []  # nothing folded yet: every party already has x_0
        blocks = [EncryptedBlock(index=i, ciphertext=self._D_bytes[i]) for i in sorted(indices)]
        template = GlobalVersionChunk(
            chunk_index=0, chunk_count=1, block_size=self.block_size, total_blocks=self.total_blocks,
            block_indices=(), blocks=(), key_fingerprint=self.ctx.fingerprint,
            layout_fingerprint=self.layout_fp, shard_index=self.settings.shard_index,
            shard_count=self.settings.shard_count, version=self.version, mode=mode, value_scale=self.value_scale,
            target_site=target_site, contributors=contributors,
            weight_units_sum=sum(c.weight_units for c in contributors), created_at=time.time(), audit=audit,
        )
        chunks = [sign_version(c, self.signing_key) for c in chunk_blocks(template, blocks, self.settings.max_message_bytes)]
        if target_site is None:
            return [_VersionMessage(Intent.VERSION_TO_ALL, None, c, mode) for c in chunks]
        return [_VersionMessage(Intent.TO_SITE, target_site, c, mode) for c in chunks]

    def snapshot(self, target_site: str | None = None, since: int | None = None) -> list[Outgoing]:
        """Every block of the current version, with the audit records a site needs to reach it
        (those after ``since``, the requester's version; the last one for a broadcast)."""
        return self._version_messages("snapshot", sorted(self._D_bytes), target_site=target_site,
                                      audit=self.audit.records_for_snapshot(self.version, since,
                                                                            self.settings.max_message_bytes))

    def drain_startup(self) -> list[Outgoing]:
        out, self.startup_outgoing = self.startup_outgoing, []
        return out

    # ------------------------------------------------------------------ control messages

    def handle_snapshot_request(self, body: bytes, *, user_id: str | None = None) -> tuple[Decision, list[Outgoing]]:
        try:
            req = decode_snapshot_request(body)
            if self.settings.check_user_id and user_id != req.site_id:
                raise IdentityMismatch(f"AMQP user_id {user_id!r} is not {req.site_id!r}")
            if req.site_id not in self.pinned:
                raise UnknownSite(f"unknown site {req.site_id!r}")
        except WireError as exc:
            return self._refuse(exc), []
        known = self.site_seq.get(req.site_id, 0)
        if req.have_version == -1 and known > 0:
            # a site starting with no state, under an id that already contributed: its ledger is gone
            detail = seqguard.known_identity_detail(req.site_id, known)
            seqguard.record(self.sites, req.site_id, 0, known)
            logger.error("site restarted without its state: %s", detail, extra={"site": req.site_id})
            self.write_status()
            return Decision("accept", site_id=req.site_id), [self._site_notice(seqguard.REASON, detail, req.site_id, None)]
        if req.shard_index != self.settings.shard_index:
            # Only shard 0 consumes the (single) snapshot-request queue; another shard's blocks
            # reach a site through that shard's start-up and periodic snapshots (docs/sharding.md).
            logger.info("snapshot of shard %d requested by %s: not ours (shard %d); it follows with that "
                        "shard's next periodic snapshot", req.shard_index, req.site_id, self.settings.shard_index)
            return Decision("accept", site_id=req.site_id), []
        logger.info("snapshot requested by %s (has %d, reason %s)", req.site_id, req.have_version, req.reason)
        out = self.snapshot(target_site=req.site_id, since=req.have_version)
        if not out:  # nothing folded yet: say so, so the site need not guess from a time-out
            out = [self._site_notice(NO_VERSION_YET, f"version {self.version}: nothing folded yet, train from x_0",
                                     req.site_id, None)]
        return Decision("accept", site_id=req.site_id), out

    def handle_site_metrics(self, body: bytes, *, user_id: str | None = None) -> Decision:
        try:
            m = decode_site_metrics(body)
            if self.settings.check_user_id and user_id != m.site_id:
                raise IdentityMismatch(f"AMQP user_id {user_id!r} is not {m.site_id!r}")
            if m.site_id not in self.pinned:
                raise UnknownSite(f"unknown site {m.site_id!r}")
        except WireError as exc:
            return self._refuse(exc)
        info = self.sites.setdefault(m.site_id, {})
        info.update(epsilon_spent=m.epsilon_spent, epsilon_target=m.epsilon_target, auc=m.auc,
                    metrics_version=m.version, n_val=m.n_val, updates_sent=m.updates_sent, metrics_at=m.timestamp,
                    alert=m.alert)
        self.metrics.site_alert(m.site_id, m.alert)
        if m.alert:
            logger.error("site %s alerts: %s", m.site_id, m.alert, extra={"site": m.site_id})
        return Decision("accept", site_id=m.site_id)

    # ------------------------------------------------------------------ housekeeping

    def expire(self, now: float | None = None) -> list[Outgoing]:
        """Dead-letter updates whose chunks stopped coming; nothing of them is folded."""
        out = []
        for uid, exc in self.assembler.expire(self.settings.incomplete_timeout_s, now=now):
            self.wal.append({"t": "expire", "uid": uid, "at": time.time()})
            pend = self._expire_update(uid)
            self.metrics.reject(exc.reason)
            logger.warning("update %s expired incomplete: %s", uid, exc.detail)
            out.append(self._notice(exc.reason, exc.detail, pend.site_id if pend else None, uid))
        return out

    def _expire_update(self, uid: str, log: bool = True) -> _Pending | None:
        pend = self.pending.pop(uid, None)
        self.assembler.discard(uid)
        self.expired.append(uid)
        if pend is not None and self.settings.mode == "sync":
            self.round_sites.discard(pend.site_id)
        return pend

    def _update_gauges(self) -> None:
        self.metrics.current_version.set(self.version)
        self.metrics.buffer_fill.set(len(self.buffer_ids))

    def status(self) -> dict[str, Any]:
        now = time.time()
        sites = {}
        for site in sorted(set(self.pinned) | set(self.sites)):
            info = dict(self.sites.get(site, {}))
            base = info.get("last_base_version")
            info["versions_behind"] = self.version - base if base is not None else None
            sites[site] = info
        return {
            "version": self.version, "mode": self.settings.mode, "buffer_fill": len(self.buffer_ids),
            "buffer_size": self.K, "pending_updates": len(self.pending), "value_scale": self.value_scale,
            "key_fingerprint": self.ctx.fingerprint, "layout_fingerprint": self.layout_fp,
            "updates_folded_total": self.updates_folded_total, "duplicates_dropped": self.duplicates_dropped,
            "rejected": dict(self.metrics.reason_counts), "sites": sites, "updated_at": now,
            "shard_index": self.settings.shard_index, "shard_count": self.settings.shard_count,
        }

    def write_status(self) -> None:
        atomic_write_json(self.state_dir / STATUS_FILE, self.status())

    def close(self) -> None:
        self.wal.close()
        self._dir_lock.release()
