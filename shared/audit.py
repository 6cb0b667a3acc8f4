"""The hash-chained audit log: one aggregator-signed record per global version.

No blockchain: there is one writer (the aggregator) and many verifiers (every site, and
anyone with ``fedmq audit verify``). Each record names what went into its version (site,
update id, ciphertext digest, weight, staleness; each site's reported epsilon), carries the
hash of the previous record and the aggregator's hybrid signature. A verifier that holds
record v can check any later record by signature and link; a fork (two records for one
version), a gap, a reordering or a tampered record fails with the version named.

Proof of inclusion: a site keeps the digest of every update it sent (``own-updates``). The
signed record of version v lists every contribution folded into v, so "my update is in v"
is the record holding (site, update id, digest), and "my update is not in v" is the signed
record without it: the aggregator cannot later claim otherwise without a second record for
v, which is a fork every site refuses.

Storage (aggregator and sites alike): ``audit-chain[-s<shard>].log`` in the state
directory, append-only, each record as a 4-byte big-endian length + its msgpack encoding,
fsynced before the version it describes is published (aggregator) or applied (site).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedmq.shared.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from fedmq.shared.codec import decode, encode
from fedmq.shared.errors import ConfigError, SignatureInvalid, WireError
from fedmq.shared.schema import AuditRecord, UpdateChunk
from fedmq.shared.signing import SigningKey, VerifyKey, chunk_digest, sign, verify

GENESIS_HASH = "0" * 64
OWN_UPDATES_FILE = "audit-own-updates.json"
_LEN = struct.Struct(">I")
#: one record is a few KiB (two signatures and a handful of contributions)
MAX_RECORD_BYTES = 64 * 1024


class AuditError(WireError):
    """An audit record or chain that must be refused; the detail names the version."""

    reason = "audit"


class AuditSignatureInvalid(AuditError):
    reason = "audit-signature"


class AuditFork(AuditError):
    reason = "audit-fork"


class AuditGap(AuditError):
    reason = "audit-gap"


class AuditMissing(AuditError):
    reason = "audit-missing"


def chain_file(state_dir: str | Path, shard_index: int = 0, shard_count: int = 1) -> Path:
    name = "audit-chain.log" if shard_count == 1 else f"audit-chain-s{shard_index}.log"
    return Path(state_dir) / name


# ---------------------------------------------------------------------------------- records


def update_digest(chunk_digests: Sequence[bytes]) -> str:
    """The ciphertext digest of an update: sha256 over the signed digests of its chunks, in
    chunk order (``shared.signing.chunk_digest``: SHA-512 of each chunk, ciphertexts included).
    The aggregator has them from verifying the signatures, so this costs no pass over the
    ciphertexts; the site computes the same from the chunks it built."""
    h = hashlib.sha256(b"fedmq/update-ciphertexts/v1\x00")
    for d in chunk_digests:
        h.update(d)
    return h.hexdigest()


def record_hash(record: AuditRecord) -> str:
    """The link to the next record: sha256 of the full encoding, signature included."""
    return hashlib.sha256(encode(record)).hexdigest()


def sign_record(record: AuditRecord, key: SigningKey) -> AuditRecord:
    payload = encode(record.model_copy(update={"signature": b""}))
    return record.model_copy(update={"signature": sign(key, "audit-record", payload)})


def verify_record(record: AuditRecord, key: VerifyKey) -> None:
    payload = encode(record.model_copy(update={"signature": b""}))
    try:
        verify(key, "audit-record", payload, record.signature)
    except SignatureInvalid as exc:
        raise AuditSignatureInvalid(f"audit record of version {record.version}: {exc.detail}") from None


def decode_record(data: bytes) -> AuditRecord:
    try:
        return decode(data, max_bytes=MAX_RECORD_BYTES, expect=AuditRecord)  # type: ignore[return-value]
    except AuditError:
        raise
    except WireError as exc:
        raise AuditError(f"undecodable audit record: {exc.detail}") from None


# ---------------------------------------------------------------------------------- chain


@dataclass
class AuditChain:
    """A verified chain held in memory.

    The aggregator's chain starts at version 1 (``prev_hash`` = GENESIS_HASH). A site that
    joins late may hold a suffix: with ``anchor_ok`` an empty chain takes the first record it
    is given as its anchor (``base`` = that version - 1); that record is still checked against
    the aggregator's key, and every later one must link to it.
    """

    key: VerifyKey
    shard_index: int = 0
    anchor_ok: bool = False
    base: int = 0
    base_hash: str = GENESIS_HASH
    hashes: list[str] = field(default_factory=list)  # hashes[v - base - 1] = hash of record v
    records: list[AuditRecord] = field(default_factory=list)

    @property
    def head(self) -> int:
        return self.base + len(self.hashes)

    @property
    def head_hash(self) -> str:
        return self.hashes[-1] if self.hashes else self.base_hash

    def check(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        """Verify ``records`` against this chain without changing it; return the new ones.

        Records at or below the head must be the very records held (else a fork); the rest
        must follow on, each linking to the one before (else a gap, a reordering or a fork).
        """
        new: list[AuditRecord] = []
        head, head_hash = self.head, self.head_hash
        anchor = self.anchor_ok and not self.hashes and self.base == 0
        for before, after in zip(records, records[1:]):
            if after.version <= before.version:
                raise AuditFork(f"audit record of version {after.version} comes after version {before.version} "
                                f"(reordered chain)")
        for rec in records:
            if rec.shard_index != self.shard_index:
                raise AuditFork(f"audit record of version {rec.version} is for shard {rec.shard_index}, "
                                f"this chain is shard {self.shard_index}")
            verify_record(rec, self.key)
            h = record_hash(rec)
            if self.base < rec.version <= self.head and not new:
                if self.hashes[rec.version - self.base - 1] != h:
                    raise AuditFork(f"audit record of version {rec.version} differs from the one held (fork)")
                continue
            if rec.version <= head:
                raise AuditFork(f"audit record of version {rec.version} is at or below version {head}, "
                                f"which this chain already holds (reordered or replayed chain)")
            if anchor and not new:
                head, head_hash = rec.version - 1, rec.prev_hash
            if rec.version != head + 1:
                raise AuditGap(f"audit record of version {rec.version} does not follow version {head} "
                               f"(records {head + 1}..{rec.version - 1} missing)")
            if rec.prev_hash != head_hash:
                raise AuditFork(f"audit record of version {rec.version} does not link to the record of "
                                f"version {head} (prev_hash {rec.prev_hash[:12]}, held {head_hash[:12]})")
            new.append(rec)
            head, head_hash = rec.version, h
        return new

    def extend(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        new = self.check(records)
        if new and not self.hashes and self.base == 0 and new[0].version > 1:
            self.base, self.base_hash = new[0].version - 1, new[0].prev_hash
        for rec in new:
            self.hashes.append(record_hash(rec))
            self.records.append(rec)
        return new

    def record(self, version: int) -> AuditRecord | None:
        i = version - self.base - 1
        return self.records[i] if 0 <= i < len(self.records) else None


class ChainFile:
    """The append-only file of one chain; reads back what survived a crash."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> list[AuditRecord]:
        """Every complete record; a torn tail (crash mid-append) is cut off."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        out, pos = [], 0
        while pos + _LEN.size <= len(data):
            (n,) = _LEN.unpack_from(data, pos)
            if n > MAX_RECORD_BYTES or pos + _LEN.size + n > len(data):
                break
            out.append(decode_record(data[pos + _LEN.size : pos + _LEN.size + n]))
            pos += _LEN.size + n
        if pos != len(data):
            self._rewrite(out)
        return out

    def append(self, records: Iterable[AuditRecord]) -> None:
        blob = b"".join(_LEN.pack(len(e)) + e for e in map(encode, records))
        if not blob:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "ab") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            fsync_dir(self.path.parent)

    def truncate_to(self, version: int) -> list[AuditRecord]:
        """Drop records above ``version`` (written before a commit that never reached its
        checkpoint, so never published); returns what is kept."""
        records = self.read()
        kept = [r for r in records if r.version <= version]
        if len(kept) != len(records):
            self._rewrite(kept)
        return kept

    def _rewrite(self, records: Sequence[AuditRecord]) -> None:
        atomic_write_bytes(self.path, b"".join(_LEN.pack(len(e)) + e for e in map(encode, records)))


def load_chain(path: str | Path, key: VerifyKey, shard_index: int = 0, anchor_ok: bool = False) -> AuditChain:
    """Read and verify a whole chain file (``fedmq audit verify``, site start-up): from genesis,
    or (``anchor_ok``, a site that joined late) from its first record."""
    chain = AuditChain(key, shard_index, anchor_ok=anchor_ok)
    records = ChainFile(path).read()
    chain.extend(records)
    return chain


# ---------------------------------------------------------------------------------- own updates


def record_own_updates(state_dir: str | Path, chunks: Iterable[UpdateChunk]) -> dict[str, str]:
    """Remember the ciphertext digest of each update (one per shard) a site built, before it
    is published: what the aggregator's record must list if it folded it (proof of inclusion)."""
    parts: dict[str, list[UpdateChunk]] = {}
    for c in chunks:
        parts.setdefault(c.update_id, []).append(c)
    digests = {uid: update_digest([chunk_digest(c) for c in sorted(cs, key=lambda c: c.chunk_index)])
               for uid, cs in parts.items()}
    seqs = {uid: cs[0].seq for uid, cs in parts.items()}
    own = load_own_updates(state_dir)
    own.update({uid: {"digest": d, "seq": seqs[uid]} for uid, d in digests.items()})
    atomic_write_json(Path(state_dir) / OWN_UPDATES_FILE, own)
    return digests


def load_own_updates(state_dir: str | Path) -> dict[str, dict]:
    path = Path(state_dir) / OWN_UPDATES_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


@dataclass(frozen=True)
class InclusionProof:
    """The answer to "was update U folded into version v?", with the signed record that says so."""

    version: int
    update_id: str
    included: bool
    digest_matches: bool | None
    record: AuditRecord

    def describe(self) -> str:
        if self.included and self.digest_matches is False:
            return (f"version {self.version} lists {self.update_id} with a ciphertext digest that differs "
                    f"from the one this site sent")
        verb = "was" if self.included else "was NOT"
        return (f"{self.update_id} {verb} folded into version {self.version} (record hash "
                f"{record_hash(self.record)[:16]}, signed by aggregator key {self.record.signer})")


def prove_inclusion(chain: AuditChain, version: int, update_id: str, digest: str | None = None) -> InclusionProof:
    rec = chain.record(version)
    if rec is None:
        raise AuditMissing(f"no audit record of version {version} in the chain (head {chain.head})")
    hit = next((c for c in rec.contributions if c.update_id == update_id), None)
    matches = None if hit is None or digest is None else hit.ciphertext_digest == digest
    return InclusionProof(version, update_id, hit is not None, matches, rec)


def find_update(chain: AuditChain, update_id: str) -> int | None:
    """The version an update was folded into, or None."""
    for rec in chain.records:
        if any(c.update_id == update_id for c in rec.contributions):
            return rec.version
    return None
