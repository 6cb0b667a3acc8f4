"""Which aggregator shard owns which ciphertext block: the one rule, imported everywhere.

Shard ``i`` of ``n`` owns the blocks ``b`` with ``b * n // total_blocks == i``: contiguous,
balanced ranges that every party computes alike from the update's own ``total_blocks``
(docs/sharding.md). The update builder splits by it, the wire schema validates by it, each
aggregator shard refuses blocks outside it, and a site replaces only that range on a shard's
snapshot. Changing the rule here changes it for all of them.
"""

from __future__ import annotations


def block_shard(block: int, total_blocks: int, shard_count: int) -> int:
    """The shard that owns ``block``."""
    return block * shard_count // total_blocks


def owned_blocks(total_blocks: int, shard_index: int, shard_count: int) -> range:
    """Every block shard ``shard_index`` owns, in order."""
    lo, hi = shard_block_range(shard_index, total_blocks, shard_count)
    return range(lo, hi)


def shard_block_range(shard_index: int, total_blocks: int, shard_count: int) -> tuple[int, int]:
    """``[lo, hi)``: the contiguous block range of one shard (empty when it owns none)."""
    if shard_count == 1:
        return 0, total_blocks
    # the smallest b with b * n // total >= i is ceil(i * total / n)
    lo = -(-shard_index * total_blocks // shard_count)
    hi = -(-(shard_index + 1) * total_blocks // shard_count)
    return min(lo, total_blocks), min(hi, total_blocks)


__all__ = ["block_shard", "owned_blocks", "shard_block_range"]
