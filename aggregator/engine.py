"""The aggregator's state machine: validate, log, fold, commit. No broker I/O.

A short coordinator over parts with one job each:

- ``aggregator.validator``: every refusal, with its reason (pure checks);
- ``aggregator.durability``: the WAL, checkpoints and recovery;
- ``aggregator.policy``: admission, weights, when to commit, sync rounds, membership;
- ``aggregator.site_status``: what is known about each site (``SiteStatus``);
- ``aggregator.fold``: the ciphertext maths; ``aggregator.audit_log``: the signed audit chain;
- ``aggregator.outgoing``: what goes out, as intents.

``accept(body, user_id=, redelivered=)`` validates one update chunk and, when it is good,
appends it to the write-ahead log (fsync) and returns a ``Decision``; the caller acks the
message (or dead-letters a refused one) and then calls ``apply(decision)``, which assembles
chunks and folds complete updates, committing a version every K folds. On start the
checkpoint is loaded and the WAL replayed with the weights recorded on arrival, so a crash
at any point folds each acknowledged update exactly once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedmq.aggregator import checkpoint as cpmod
from fedmq.aggregator import fold as foldmod
from fedmq.aggregator import seqguard
from fedmq.aggregator import validator as checks
from fedmq.aggregator.audit_log import AggregatorAudit
from fedmq.aggregator.blockstore import CiphertextStore
from fedmq.aggregator.durability import Durability
from fedmq.aggregator.metrics import AggregatorMetrics
from fedmq.aggregator.outgoing import Intent, Outgoing, VersionMessage, dead_letter_notice, site_notice
from fedmq.aggregator.policy import Admission, Policy, answer_snapshot_request
from fedmq.aggregator.settings import AggregatorSettings
from fedmq.aggregator.site_status import SiteStatus
from fedmq.aggregator.validator import NOTIFY_SITE, BadCiphertext, BlockSizeMismatch, WrongShard
from fedmq.aggregator.wal import FramedBody, frame_body
from fedmq.broker.topology import DETAIL_HEADER, REASON_HEADER
from fedmq.shared.atomic import atomic_write_json
from fedmq.shared.chunking import ChunkAssembler, chunk_blocks, header_of, header_room
from fedmq.shared.ckks import HeVector, LoadedContext, check_ciphertext, load_ciphertext, load_context
from fedmq.shared.ckks_wire import CiphertextError
from fedmq.shared.codec import decode_site_metrics, decode_snapshot_request, decode_update_chunk
from fedmq.shared.errors import CryptoError, MessageTooLarge, WireError
from fedmq.shared.schema import NO_VERSION_YET, Contributor, EncryptedBlock, GlobalVersionChunk, UpdateChunk
from fedmq.shared.signing import SigningKey, load_pinned_keys, load_private_key
from fedmq.shared.statelock import lock_state_dir

logger = logging.getLogger(__name__)

STATUS_FILE = "status.json"
#: fields of a chunk's WAL record (``accept``), its body first (``fedmq.aggregator.wal.frame_body``)
_CHUNK_RECORD_FIELDS = 10
CRASH_POINTS = ("after-wal", "before-ack", "after-fold", "after-checkpoint")

#: a test seam: called with one of CRASH_POINTS as execution passes it (never during WAL
#: replay). Nothing in fedmq sets one; tests inject a hook that kills the process there
#: (tests/launcher.py) to prove that every acknowledged update is folded exactly once.
CrashHook = Callable[[str], None]

__all__ = [
    "AggregatorEngine", "BadCiphertext", "BlockSizeMismatch", "CRASH_POINTS", "CrashHook", "Decision", "Intent",
    "NOTIFY_SITE", "Outgoing", "Prechecked", "STATUS_FILE", "WrongShard",
]


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


@dataclass(frozen=True)
class Prechecked:
    """The validator's first stage on one chunk (``AggregatorEngine.precheck``)."""

    layout: tuple[str | None, int | None]  # the (layout fingerprint, total blocks) it checked against
    chunk: UpdateChunk | None  # None: not decodable
    checked: checks.CheckedChunk | None
    refusal: WireError | None = None
    framed: FramedBody | None = None  # the WAL framing of the body (CRC included), when it passed


@dataclass
class _Pending:
    """An update whose chunks are logged but not all here yet."""

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
        self.policy.check_members()
        self.K = self.policy.commit_after
        self.value_scale = foldmod.value_scale(s.server_lr, s.weight_quantum, self.K)
        self.block_size = self.ctx.block_size
        self.rules = checks.ChunkRules(
            ctx=self.ctx, pinned=self.pinned, block_size=self.block_size, shard_index=s.shard_index,
            shard_count=s.shard_count, max_message_bytes=s.max_message_bytes, check_user_id=s.check_user_id,
            public_context=str(s.public_context), layout_from_settings=bool(s.layout_fingerprint),
        )
        self.limits = checks.Limits(s.max_pending_updates, s.max_pending_updates_per_site,
                                    s.max_pending_bytes_per_site, s.max_pending_bytes)
        self.durable = Durability(self.state_dir)

        self.version = 0
        self._D_bytes: dict[int, bytes] = {}
        self.D = CiphertextStore(self.ctx, self._D_bytes)  # D_v as wire bytes only
        self.buffer: dict[int, HeVector] = {}
        self.contributors: list[Contributor] = []
        self.buffer_ids: list[str] = []
        self.pending: dict[str, _Pending] = {}
        self.assembler: ChunkAssembler[UpdateChunk] = ChunkAssembler(
            lambda c: c.update_id, max_pending=s.max_pending_updates, max_pending_bytes=s.max_pending_bytes
        )
        self.site_seq: dict[str, int] = {}
        self.recent: deque[tuple[int, list[str]]] = deque(maxlen=s.remember_versions)
        self._known: set[str] = set()
        self.expired: deque[str] = deque(maxlen=4096)
        self.sites: dict[str, SiteStatus] = {}
        self.layout_fp = s.layout_fingerprint
        self.total_blocks: int | None = None
        self.duplicates_dropped = 0
        self.updates_folded_total = 0
        self.startup_outgoing: list[Outgoing] = []
        self._replaying = False
        self._unsynced = 0  # chunks logged since the last group fsync (accept(sync=False))

        self._recover()

    # ------------------------------------------------------------------ the ledger stage 2 reads

    def is_folded(self, update_id: str) -> bool:
        return update_id in self._known or update_id in self.buffer_ids

    def last_header(self, site_id: str) -> str | None:
        st = self.sites.get(site_id)
        return st.last_header if st is not None else None

    def buffered_units(self) -> Iterable[int]:
        """Weight units in the buffer and in incomplete updates (the headroom check's sum)."""
        return [c.weight_units for c in self.contributors] + [p.admission.weight_units for p in self.pending.values()]

    def site(self, site_id: str) -> SiteStatus:
        st = self.sites.get(site_id)
        if st is None:
            st = self.sites[site_id] = SiteStatus()
        return st

    @property
    def round_sites(self) -> set[str]:
        return self.policy.round_sites

    @property
    def segment(self) -> str:
        """The WAL segment the last checkpoint names."""
        return self.durable.segment

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
        cp = self.durable.load_checkpoint()
        if cp is not None:
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
            self.sites = {k: SiteStatus.from_dict(v) for k, v in cp.sites.items()}
            for site, st in self.sites.items():
                if st.sample_weight is not None:
                    self.policy.note_reported(site, st.sample_weight)
        records = self.durable.start(cp)
        if cp is None:
            self.durable.save_checkpoint(self._checkpoint())
        self.audit.recover(self.version)  # the chain, cut back to the checkpoint (audit_log.py)
        self._replaying = True
        try:
            for i, rec in enumerate(records):
                self._replay_record(rec, records[i + 1 :])
        finally:
            self._replaying = False
        self.durable.open_log()
        self._update_gauges()
        if records:
            logger.info("replayed %d WAL records; version %d, buffer %d/%d, %d incomplete",
                        len(records), self.version, len(self.buffer_ids), self.K, len(self.pending))
        self.startup_outgoing.extend(self.snapshot())
        self.write_status()

    def _replay_record(self, rec: dict[str, Any], later: list[dict[str, Any]]) -> None:
        if rec.get("t") == "expire":
            self._forget_pending(rec["uid"], expired=True)
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

    def _refuse(self, exc: WireError, chunk: UpdateChunk | None = None, site: str | None = None) -> Decision:
        site = chunk.site_id if chunk else site
        first = self.metrics.reject(exc.reason)  # the metric label is the dead-letter reason
        if site in self.sites or (site and site in self.pinned):
            self.site(site).note_refused(exc.reason)
        log = logger.warning if first else logger.debug
        log("refused chunk: %s: %s", exc.reason, exc.detail, extra={"reason": exc.reason, "site": site})
        return Decision("reject", exc.reason, exc.detail, site, chunk.update_id if chunk else None, chunk)

    def precheck(self, body: bytes, *, user_id: str | None = None) -> Prechecked:
        """The validator's first stage (decode, signature, ciphertext bytes: the costly hashing)
        for ``accept(pre=)``. Reads no state but the layout, which it records, so it may run on
        another thread than the engine's while the engine folds (``fedmq.aggregator.consumer``)."""
        layout = (self.layout_fp, self.total_blocks)
        chunk: UpdateChunk | None = None
        try:
            chunk = checks.decode_chunk(body, self.rules)
            checked = checks.check_chunk(chunk, len(body), user_id, self.rules,
                                         layout_fp=layout[0], total_blocks=layout[1])
            return Prechecked(layout, chunk, checked, framed=frame_body(bytes(body), _CHUNK_RECORD_FIELDS))
        except WireError as exc:
            return Prechecked(layout, chunk, None, exc)

    def accept(self, body: bytes, *, user_id: str | None = None, redelivered: bool = False,
               pre: Prechecked | None = None, sync: bool = True) -> Decision:
        """Validate one update chunk; WAL it (fsync) when good. Ack after this returns.
        ``pre``: ``precheck`` of these very bytes and user id, done ahead (used unless the
        layout it checked against has been fixed since). ``sync=False`` (group commit): the
        record is durable only after ``sync_log()``, and the message must not be acked before."""
        self.metrics.bytes_in.inc(len(body))
        stale = pre is not None and pre.layout != (self.layout_fp, self.total_blocks)
        if pre is None or (stale and pre.refusal is not None):
            # the first update fixed the layout meanwhile: check again, so that the reason is
            # the one an in-order check gives (the layout's, when both are wrong)
            pre, stale = self.precheck(body, user_id=user_id), False
        chunk = pre.chunk
        try:
            if pre.refusal is not None:
                raise pre.refusal
            if stale and chunk is not None:  # passed every check, the layout's against None
                checks.check_layout(chunk, self.rules, layout_fp=self.layout_fp, total_blocks=self.total_blocks)
            checked = pre.checked
            if chunk is None or checked is None:
                raise RuntimeError("precheck gave neither a checked chunk nor a refusal")
            verdict = checks.check_admission(chunk, len(body), redelivered=redelivered, ledger=self,
                                             policy=self.policy, ctx=self.ctx, limits=self.limits)
        except WireError as exc:
            if isinstance(exc, seqguard.SequenceBackwards) and chunk is not None:
                self.site(chunk.site_id).note_sequence_backwards(chunk.seq, self.site_seq.get(chunk.site_id, 0))
                logger.error("sequence went backwards: %s", exc.detail, extra={"site": chunk.site_id})
            return self._refuse(exc, chunk)
        if isinstance(verdict, checks.Drop):
            self.duplicates_dropped += 1
            self.metrics.duplicates_dropped.inc()
            logger.debug("dropping redelivered chunk %s/%d: %s", chunk.update_id, chunk.chunk_index, verdict.why)
            return Decision("drop", "duplicate", verdict.why, chunk.site_id, chunk.update_id, chunk)
        framed = pre.framed or frame_body(bytes(body), _CHUNK_RECORD_FIELDS)
        record = {
            "body": framed.body, "t": "chunk", "uid": chunk.update_id, "ci": chunk.chunk_index,
            "st": verdict.staleness, "u": verdict.weight_units, "user": user_id,
            "redelivered": bool(redelivered), "at": time.time(), "dg": checked.digest,
        }
        self.durable.log(record, framed, sync=sync)
        if sync:
            self.crash("after-wal")
        else:
            self._unsynced += 1
        self._register(chunk, verdict, record)
        return Decision("accept", "", "", chunk.site_id, chunk.update_id, chunk, record)

    def sync_log(self) -> None:
        """Group commit: one fsync makes every chunk accepted with ``sync=False`` durable; their
        messages may be acked once this returns."""
        if not self._unsynced:
            return
        self.durable.sync()
        synced, self._unsynced = self._unsynced, 0
        for _ in range(synced):
            self.crash("after-wal")

    def _register(self, chunk: UpdateChunk, admission: Admission, record: dict[str, Any]) -> None:
        """A logged chunk (accepted now, or replayed from the WAL) joins its update."""
        uid = chunk.update_id
        pend = self.pending.get(uid)
        if pend is None:
            pend = self.pending[uid] = _Pending(
                chunk.site_id, chunk.seq, chunk.base_version, chunk.sample_weight, admission, header_of(chunk)
            )
            self.site_seq[chunk.site_id] = max(chunk.seq, self.site_seq.get(chunk.site_id, 0))
            self.policy.note_reported(chunk.site_id, chunk.sample_weight)
            newest = chunk.seq >= self.site_seq[chunk.site_id]
            self.site(chunk.site_id).note_first_chunk(
                chunk.sample_weight, seqguard.header_digest(header_of(chunk)) if newest else None, chunk.seq)
            self.policy.note_admitted(chunk.site_id)
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
            return [site_notice(decision.reason, decision.detail, decision.site_id, decision.update_id,
                                self.site_seq.get(decision.site_id, 0))]
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
        adm = pend.admission
        self.contributors.append(Contributor(
            site_id=pend.site_id, update_id=uid, base_version=pend.base_version, staleness=adm.staleness,
            weight_units=adm.weight_units, sample_weight=float(pend.sample_weight),
        ))
        self.site(pend.site_id).note_folded(uid, adm.staleness, adm.weight_units, pend.base_version)
        self._update_gauges()
        self.crash("after-fold")
        if self.policy.commit_due(len(self.buffer_ids)):
            return self._commit(carry)
        return []

    def _load(self, block: EncryptedBlock) -> HeVector:
        try:
            return load_ciphertext(self.ctx, block.ciphertext, checked=True)  # checked before the WAL
        except CiphertextError as exc:  # keeps its own reason (ciphertext-corrupt, -key, ...)
            exc.detail = f"block {block.index}: {exc.detail}"
            raise
        except CryptoError as exc:
            raise BadCiphertext(f"block {block.index}: {exc}") from None

    def _forget_pending(self, uid: str, *, expired: bool) -> _Pending | None:
        """An incomplete update leaves without being folded (nothing of it was)."""
        pend = self.pending.pop(uid, None)
        self.assembler.discard(uid)
        if expired:
            self.expired.append(uid)
        if pend is not None:
            self.policy.note_abandoned(pend.site_id)
        return pend

    def _drop_pending(self, uid: str, exc: WireError) -> list[Outgoing]:
        """An update that cannot be folded after its chunks were acked: forget it, dead-letter a notice."""
        pend = self._forget_pending(uid, expired=False)
        if self._replaying:
            return []
        self.metrics.reject(exc.reason)
        logger.warning("update %s dropped: %s: %s", uid, exc.reason, exc.detail)
        return [dead_letter_notice(exc.reason, exc.detail, pend.site_id if pend else None, uid)]

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
        self.policy.start_round({p.site_id for p in self.pending.values()})
        # the new segment: the records of still-incomplete updates + (during replay) those after this one
        self.durable.begin_segment(self.version, [r for p in self.pending.values() for r in p.records] + list(carry))
        self.audit.commit(self.version, contributors, self._sites_plain())  # before the checkpoint (audit_log.py)
        self.durable.save_checkpoint(self._checkpoint())
        self.crash("after-checkpoint")
        self.durable.end_segment(reopen=not self._replaying)
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

    def _sites_plain(self) -> dict[str, dict[str, Any]]:
        return {site: st.to_dict() for site, st in self.sites.items()}

    def _checkpoint(self) -> cpmod.Checkpoint:
        return cpmod.Checkpoint(
            version=self.version, value_scale=self.value_scale, config=self._config(),
            blocks=dict(self._D_bytes), site_seq=dict(self.site_seq),
            recent=[(v, list(ids)) for v, ids in self.recent], sites=self._sites_plain(),
        )

    # ------------------------------------------------------------------ outgoing versions

    def _version_messages(
        self, mode: Literal["delta", "snapshot"], indices: list[int], *,
        contributors: tuple[Contributor, ...] = (), target_site: str | None = None, audit: tuple[bytes, ...] = (),
    ) -> list[Outgoing]:
        if self.layout_fp is None or self.total_blocks is None:
            return []  # nothing folded yet: every party already has x_0
        template = self._template(mode, contributors=contributors, target_site=target_site, audit=audit)
        return self._chunked(template, indices, target_site)

    def _template(self, mode: Literal["delta", "snapshot"], *, contributors: tuple[Contributor, ...] = (),
                  target_site: str | None = None, audit: tuple[bytes, ...] = ()) -> GlobalVersionChunk:
        assert self.layout_fp is not None and self.total_blocks is not None
        return GlobalVersionChunk(
            chunk_index=0, chunk_count=1, block_size=self.block_size, total_blocks=self.total_blocks,
            block_indices=(), blocks=(), key_fingerprint=self.ctx.fingerprint,
            layout_fingerprint=self.layout_fp, shard_index=self.settings.shard_index,
            shard_count=self.settings.shard_count, version=self.version, mode=mode, value_scale=self.value_scale,
            target_site=target_site, contributors=contributors,
            weight_units_sum=sum(c.weight_units for c in contributors), created_at=time.time(), audit=audit,
        )

    def _chunked(self, template: GlobalVersionChunk, indices: list[int], target_site: str | None) -> list[Outgoing]:
        mode = template.mode
        blocks = [EncryptedBlock(index=i, ciphertext=self._D_bytes[i]) for i in sorted(indices)]
        chunks = chunk_blocks(template, blocks, self.settings.max_message_bytes)
        key = self.signing_key  # each chunk is signed when it is published (VersionMessage)
        if target_site is None:
            return [VersionMessage(Intent.VERSION_TO_ALL, None, c, mode, signing_key=key) for c in chunks]
        return [VersionMessage(Intent.TO_SITE, target_site, c, mode, signing_key=key) for c in chunks]

    def snapshot(self, target_site: str | None = None, since: int | None = None) -> list[Outgoing]:
        """Every block of the current version, with the audit records a site needs to reach it
        (those after ``since``, the requester's version; the last one for a broadcast): as many
        as the largest block leaves room for in one message, so the snapshot always fits."""
        if self.layout_fp is None or self.total_blocks is None:
            return []  # nothing folded yet: every party already has x_0
        indices = sorted(self._D_bytes)
        template = self._template("snapshot", target_site=target_site)
        room = header_room(template, indices, max((len(self._D_bytes[i]) for i in indices), default=0),
                           self.settings.max_message_bytes)
        audit = self.audit.records_for_snapshot(self.version, since, room)
        return self._chunked(template.model_copy(update={"audit": audit}), indices, target_site)

    def drain_startup(self) -> list[Outgoing]:
        out, self.startup_outgoing = self.startup_outgoing, []
        return out

    # ------------------------------------------------------------------ control messages

    def handle_snapshot_request(self, body: bytes, *, user_id: str | None = None) -> tuple[Decision, list[Outgoing]]:
        try:
            req = decode_snapshot_request(body)
            checks.check_sender(req.site_id, user_id, self.rules)
        except WireError as exc:
            return self._refuse(exc), []
        known = self.site_seq.get(req.site_id, 0)
        answer = answer_snapshot_request(have_version=req.have_version, accepted_seq=known,
                                         shard_index=req.shard_index, own_shard=self.settings.shard_index)
        ok = Decision("accept", site_id=req.site_id)
        if answer == "known-identity":
            detail = seqguard.known_identity_detail(req.site_id, known)
            self.site(req.site_id).note_sequence_backwards(0, known)
            logger.error("site restarted without its state: %s", detail, extra={"site": req.site_id})
            self.write_status()
            return ok, [site_notice(seqguard.REASON, detail, req.site_id, None, known)]
        if answer == "other-shard":
            logger.info("snapshot of shard %d requested by %s: not ours (shard %d); it follows with that "
                        "shard's next periodic snapshot", req.shard_index, req.site_id, self.settings.shard_index)
            return ok, []
        logger.info("snapshot requested by %s (has %d, reason %s)", req.site_id, req.have_version, req.reason)
        try:
            out = self.snapshot(target_site=req.site_id, since=req.have_version)
        except MessageTooLarge as exc:
            # max_message_bytes is below one block plus one audit record: refused (dead-lettered
            # with the reason), never a crash, so a redelivered request cannot restart-loop the
            # aggregator; deltas that fit keep flowing
            logger.error("cannot answer %s's snapshot request: %s; raise max_message_bytes",
                         req.site_id, exc.detail, extra={"site": req.site_id})
            return self._refuse(exc, site=req.site_id), []
        if not out:  # nothing folded yet: say so, so the site need not guess from a time-out
            out = [site_notice(NO_VERSION_YET, f"version {self.version}: nothing folded yet, train from x_0",
                               req.site_id, None, known)]
        return ok, out

    def handle_site_metrics(self, body: bytes, *, user_id: str | None = None) -> Decision:
        try:
            m = decode_site_metrics(body)
            checks.check_sender(m.site_id, user_id, self.rules)
        except WireError as exc:
            return self._refuse(exc)
        self.site(m.site_id).note_metrics(
            epsilon_spent=m.epsilon_spent, epsilon_target=m.epsilon_target, auc=m.auc, version=m.version,
            n_val=m.n_val, updates_sent=m.updates_sent, at=m.timestamp, alert=m.alert)
        self.metrics.site_alert(m.site_id, m.alert)
        if m.alert:
            logger.error("site %s alerts: %s", m.site_id, m.alert, extra={"site": m.site_id})
        return Decision("accept", site_id=m.site_id)

    # ------------------------------------------------------------------ housekeeping

    def expire(self, now: float | None = None) -> list[Outgoing]:
        """Dead-letter updates whose chunks stopped coming; nothing of them is folded."""
        out = []
        for uid, exc in self.assembler.expire(self.settings.incomplete_timeout_s, now=now):
            self.durable.log({"t": "expire", "uid": uid, "at": time.time()})
            pend = self._forget_pending(uid, expired=True)
            self.metrics.reject(exc.reason)
            logger.warning("update %s expired incomplete: %s", uid, exc.detail)
            out.append(dead_letter_notice(exc.reason, exc.detail, pend.site_id if pend else None, uid))
        return out

    def _update_gauges(self) -> None:
        self.metrics.current_version.set(self.version)
        self.metrics.buffer_fill.set(len(self.buffer_ids))

    def status(self) -> dict[str, Any]:
        sites = {}
        for site in sorted(set(self.pinned) | set(self.sites)):
            st = self.sites.get(site)
            info = st.to_dict() if st is not None else {}
            base = info.get("last_base_version")
            info["versions_behind"] = self.version - base if base is not None else None
            sites[site] = info
        return {
            "version": self.version, "mode": self.settings.mode, "buffer_fill": len(self.buffer_ids),
            "buffer_size": self.K, "pending_updates": len(self.pending), "value_scale": self.value_scale,
            "key_fingerprint": self.ctx.fingerprint, "layout_fingerprint": self.layout_fp,
            "updates_folded_total": self.updates_folded_total, "duplicates_dropped": self.duplicates_dropped,
            "rejected": dict(self.metrics.reason_counts), "sites": sites, "updated_at": time.time(),
            "shard_index": self.settings.shard_index, "shard_count": self.settings.shard_count,
        }

    def write_status(self) -> None:
        # a view of the checkpointed state, rewritten at every commit and housekeeping: no fsync
        atomic_write_json(self.state_dir / STATUS_FILE, self.status(), durable=False)

    def close(self) -> None:
        self.durable.close()
        self._dir_lock.release()
