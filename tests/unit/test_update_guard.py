"""The update-id rule and the bounds on incomplete updates (fedmq.aggregator.update_guard)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from fedmq.aggregator.update_guard import PendingLimit, check_pending_room, check_update_id
from fedmq.shared.errors import IdentityMismatch
from fedmq.shared.schema import EncryptedBlock, UpdateChunk
from fedmq.shared.update_ids import expected_update_id
from fedmq.site_agent.update_builder import UpdateIdentity, shard_update_id


def _chunk(site: str = "hospital_1", seq: int = 3, uid: str | None = None, shard: tuple[int, int] = (0, 1)) -> UpdateChunk:
    index, count = shard
    return UpdateChunk(
        chunk_index=0, chunk_count=2, block_size=2048, total_blocks=8, block_indices=(index * 8 // count,),
        blocks=(EncryptedBlock(index=index * 8 // count, ciphertext=b"x"),), key_fingerprint="k" * 16,
        layout_fingerprint="l" * 16, shard_index=index, shard_count=count, site_id=site,
        update_id=uid if uid is not None else expected_update_id(site, seq, index, count), seq=seq, base_version=0,
        sample_weight=1.0, sparsity_mode="dense", sparsity_fraction=1.0, created_at=1.0,
    )


def test_the_site_builds_the_ids_the_aggregator_expects() -> None:
    base = UpdateIdentity("hospital_1", 3, 0, 1.0).update_id
    assert base == expected_update_id("hospital_1", 3) == "hospital_1:3"
    assert shard_update_id(base, 2, 4) == expected_update_id("hospital_1", 3, 2, 4) == "hospital_1:3:s2"


@pytest.mark.parametrize("uid", ["hospital_2:3", "hospital_1:4", "hospital_10:3", "hospital_1:3:s0", "x", "hospital_1"])
def test_an_id_that_is_not_the_chunks_own_is_refused(uid: str) -> None:
    with pytest.raises(IdentityMismatch) as info:
        check_update_id(_chunk(uid=uid))
    assert info.value.reason == "identity"


def test_own_ids_pass_with_and_without_shards() -> None:
    check_update_id(_chunk())
    check_update_id(_chunk(shard=(1, 2)))
    with pytest.raises(IdentityMismatch):
        check_update_id(_chunk(uid="hospital_1:3:s0", shard=(1, 2)))


@dataclass
class _Pend:
    site_id: str
    records: list[dict[str, Any]] = field(default_factory=list)


def _held(site: str, *sizes: int) -> _Pend:
    return _Pend(site, [{"body": b"\0" * n} for n in sizes])


LIMITS = {"max_updates_per_site": 2, "max_bytes_per_site": 1000, "max_bytes": 1500}


def test_pending_bounds_per_site_count() -> None:
    pending = {"hospital_1:1": _held("hospital_1", 10), "hospital_1:2": _held("hospital_1", 10)}
    with pytest.raises(PendingLimit) as info:
        check_pending_room(pending, _chunk(seq=3), 10, **LIMITS)
    assert info.value.reason == "pending-limit"
    check_pending_room(pending, _chunk(seq=2, uid="hospital_1:2"), 10, **LIMITS)  # more of one it already holds
    check_pending_room(pending, _chunk(site="hospital_2", seq=1), 10, **LIMITS)  # another site's share


def test_pending_bounds_bytes_per_site_and_in_total() -> None:
    pending = {"hospital_1:1": _held("hospital_1", 600, 300), "hospital_2:1": _held("hospital_2", 500)}
    with pytest.raises(PendingLimit):
        check_pending_room(pending, _chunk(seq=1, uid="hospital_1:1"), 101, **LIMITS)
    check_pending_room(pending, _chunk(seq=1, uid="hospital_1:1"), 100, **LIMITS)
    with pytest.raises(PendingLimit):  # hospital_3 is within its own share, but not the total
        check_pending_room(pending, _chunk(site="hospital_3", seq=1), 101, **LIMITS)
