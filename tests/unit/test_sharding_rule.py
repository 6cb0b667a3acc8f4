"""The one shard-ownership rule (shared/sharding.py): the contiguous ranges the receiver and
the aggregator use are exactly the blocks ``b * n // total == i`` the builder and schema use."""

from __future__ import annotations

import pytest

from fedmq.shared.sharding import block_shard, owned_blocks, shard_block_range


@pytest.mark.parametrize("total", [1, 2, 3, 7, 10, 64, 101])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_ranges_partition_the_blocks_by_the_rule(total: int, n: int) -> None:
    seen: list[int] = []
    for i in range(n):
        lo, hi = shard_block_range(i, total, n)
        assert list(owned_blocks(total, i, n)) == list(range(lo, hi))
        assert all(block_shard(b, total, n) == i for b in range(lo, hi))
        seen += range(lo, hi)
    assert seen == list(range(total))
