"""The one rule for update ids: ``<site>:<seq>``, plus ``:s<i>`` for shard i of several.

A site builds its ids with these functions and the aggregator checks every chunk against
them, so an id names its sender: hospital_1 cannot publish ``hospital_2:1`` (the squat found
in issue 15) and the aggregator's duplicate detection, keyed by id, is per (site, id).
"""

from __future__ import annotations


def update_id(site_id: str, seq: int) -> str:
    """``<site>:<seq>``; site ids contain no ``:`` (``fedmq.shared.schema.SiteId``)."""
    return f"{site_id}:{seq}"


def shard_update_id(base_id: str, shard_index: int, shard_count: int) -> str:
    """``<site>:<seq>`` unchanged with one shard, ``<site>:<seq>:s<i>`` with several."""
    return base_id if shard_count == 1 else f"{base_id}:s{shard_index}"


def expected_update_id(site_id: str, seq: int, shard_index: int = 0, shard_count: int = 1) -> str:
    """The only id a chunk with these header fields may carry."""
    return shard_update_id(update_id(site_id, seq), shard_index, shard_count)


__all__ = ["expected_update_id", "shard_update_id", "update_id"]
