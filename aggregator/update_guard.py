"""Who may use an update id, and how much an incomplete update may hold (issue 15).

Two rules the engine applies to every chunk before it touches its duplicate bookkeeping:

- **The id names its sender.** A chunk's ``update_id`` must be exactly the id its own
  authenticated ``site_id``, ``seq`` and shard would give (:mod:`shared.update_ids`). Without
  this, hospital_1 (with its own key and broker user) could publish ``hospital_2:1``; ids are
  predictable and listed in every version's contributors, so the squat would be folded and
  hospital_2's real update then refused as a duplicate. With it, every id reaching the
  engine's (id-keyed) duplicate sets belongs to its chunk's site: de-duplication is per
  (site, id), and one site cannot block another's ids.
- **Incomplete updates are bounded.** Per site at most ``max_pending_updates_per_site``
  incomplete updates and ``max_pending_bytes_per_site`` bytes of their chunks, and at most
  ``max_pending_bytes`` over all sites, are held; a chunk that would exceed a bound is refused
  before it is logged (reason ``pending-limit``), so one site cannot fill the aggregator's
  memory or crowd out the others. In time, the engine's housekeeping expires an update whose
  chunks stopped coming after ``incomplete_timeout_s``; its memory is released, and the same
  update sent again in full is accepted (nothing of it was folded), so an expired id is not
  blocked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from fedmq.shared.errors import ChunkError, IdentityMismatch
from fedmq.shared.schema import UpdateChunk
from fedmq.shared.update_ids import expected_update_id


class PendingLimit(ChunkError):
    """Accepting this chunk would hold more incomplete data than a bound allows."""

    reason = "pending-limit"


class PendingUpdate(Protocol):
    """What the guard reads of the engine's record of one incomplete update."""

    site_id: str
    records: list[dict[str, Any]]


def check_update_id(chunk: UpdateChunk) -> None:
    """Refuse (``identity``) a chunk whose id is not the one its own header fields give."""
    expected = expected_update_id(chunk.site_id, chunk.seq, chunk.shard_index, chunk.shard_count)
    if chunk.update_id != expected:
        raise IdentityMismatch(
            f"update_id {chunk.update_id!r} does not belong to site {chunk.site_id!r} seq {chunk.seq} "
            f"(expected {expected!r})"
        )


def _held_bytes(update: PendingUpdate) -> int:
    return sum(len(r["body"]) for r in update.records)


def check_pending_room(
    pending: Mapping[str, PendingUpdate],
    chunk: UpdateChunk,
    nbytes: int,
    *,
    max_updates_per_site: int,
    max_bytes_per_site: int,
    max_bytes: int,
) -> None:
    """Refuse (``pending-limit``) a chunk that would push incomplete updates over a bound."""
    site = chunk.site_id
    mine = [p for p in pending.values() if p.site_id == site]
    if chunk.update_id not in pending and len(mine) >= max_updates_per_site:
        raise PendingLimit(f"{site} already has {len(mine)} incomplete updates; refusing {chunk.update_id}")
    site_bytes = sum(_held_bytes(p) for p in mine)
    if site_bytes + nbytes > max_bytes_per_site:
        raise PendingLimit(
            f"{site}'s incomplete updates would hold {site_bytes + nbytes} bytes (limit {max_bytes_per_site})"
        )
    total = sum(_held_bytes(p) for p in pending.values())
    if total + nbytes > max_bytes:
        raise PendingLimit(f"incomplete updates would hold {total + nbytes} bytes (limit {max_bytes})")


__all__ = ["PendingLimit", "check_pending_room", "check_update_id"]
