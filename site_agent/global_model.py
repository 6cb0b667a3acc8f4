"""Applies global versions from the aggregator, in order, and notices gaps.

The site keeps D_v decrypted; the model is x_v = x_0 + value_scale * D_v. Delta messages
carry the new D value of each changed block, snapshots every non-zero block, so a site that
applied deltas and one that loaded a snapshot hold bit-identical weights.

With a sharded aggregator (``shard_count`` n > 1, docs/sharding.md) every shard commits its
own block range and numbers its own versions: the receiver keeps one version per shard
(``state.shard_versions``; ``state.version`` is their sum, a counter that grows whenever any
shard moves), checks deltas for gaps per shard, and a shard's snapshot replaces only that
shard's blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedmq.shared.chunking import Assembled, ChunkAssembler
from fedmq.shared.ckks import LoadedContext, decrypt_block
from fedmq.shared.errors import KeyMismatch, LayoutMismatch
from fedmq.shared.schema import GlobalVersionChunk
from fedmq.shared.sharding import shard_block_range
from fedmq.site_agent.model_state import model_vector
from fedmq.site_agent.state import SiteState
from fedmq.site_agent.state_owner import SiteStateOwner
from fedmq.site_agent.version_guard import VersionGuard

logger = logging.getLogger(__name__)

Outcome = Literal["applied", "old", "gap", "incomplete", "not-for-us"]


@dataclass(frozen=True)
class ApplyResult:
    outcome: Outcome
    #: the version now held (of ``shard``, when sharded)
    version: int
    message_version: int
    shard: int = 0


def version_key(chunk: GlobalVersionChunk) -> str:
    key = f"{chunk.version}:{chunk.mode}:{chunk.target_site or '*'}"
    return key if chunk.shard_count == 1 else f"{key}:s{chunk.shard_index}"


class ShardMismatch(LayoutMismatch):
    """A global version from an aggregator sharded differently from this site's setting."""


class GlobalModelReceiver:
    def __init__(
        self, state: SiteStateOwner | SiteState, ctx: LoadedContext, layout_fingerprint: str, model_size: int,
        shard_count: int = 1, *, guard: VersionGuard,
    ) -> None:
        """``state``: the site's state owner (a bare ``SiteState`` gets a private owner: single-
        threaded tools such as the evaluator)."""
        self.owner = state if isinstance(state, SiteStateOwner) else SiteStateOwner(state)
        self.site_id = self.owner.view().site_id
        #: signatures, rollback/replay and the audit chain (site_agent/version_guard.py)
        self.guard = guard
        self.ctx = ctx
        self.layout_fingerprint = layout_fingerprint
        self.model_size = model_size
        self.shard_count = shard_count
        self.assembler: ChunkAssembler[GlobalVersionChunk] = ChunkAssembler(version_key, max_pending=16 * shard_count)
        if shard_count > 1:
            with self.owner.edit() as st:
                held = st.shard_versions
                if held is None:
                    # a state written before sharding (or fresh): its single version is shard-less
                    if st.version != 0:
                        logger.warning("site state holds version %d of an unsharded aggregator; "
                                       "tracking %d shards from 0", st.version, shard_count)
                    st.shard_versions = [0] * shard_count
                elif len(held) != shard_count:
                    raise ShardMismatch(f"site state tracks {len(held)} shards, settings say {shard_count}")
                st.version = sum(st.shard_versions)

    def shard_version(self, shard: int = 0) -> int:
        """The version held of one shard (the version, with one shard)."""
        view = self.owner.view()
        if self.shard_count == 1:
            return view.version
        assert view.shard_versions is not None
        return view.shard_versions[shard]

    def versions(self) -> tuple[int, ...]:
        return tuple(self.shard_version(i) for i in range(self.shard_count))

    def offer(self, chunk: GlobalVersionChunk) -> ApplyResult:
        """Feed one chunk; returns what happened once its version is complete."""
        shard = chunk.shard_index
        self.guard.check_signature(chunk)
        if chunk.target_site is not None and chunk.target_site != self.site_id:
            return ApplyResult("not-for-us", self.shard_version(0), chunk.version, shard)
        if chunk.key_fingerprint != self.ctx.fingerprint:
            raise KeyMismatch(f"global version under key {chunk.key_fingerprint}, ours is {self.ctx.fingerprint}")
        if chunk.layout_fingerprint != self.layout_fingerprint:
            raise LayoutMismatch(f"global version for layout {chunk.layout_fingerprint}")
        if chunk.shard_count != self.shard_count:
            raise ShardMismatch(f"global version from a {chunk.shard_count}-shard aggregator; "
                                f"this site expects {self.shard_count} shard(s)")
        held = self.shard_version(shard)
        if not self.guard.check_not_old(chunk, held):
            # Nothing newer; still consume the chunks so a partial set never lingers.
            self.assembler.discard(version_key(chunk))
            return ApplyResult("old", held, chunk.version, shard)
        done = self.assembler.add(chunk)
        if done is None:
            return ApplyResult("incomplete", held, chunk.version, shard)
        return self._apply(done)

    def _apply(self, done: Assembled[GlobalVersionChunk]) -> ApplyResult:
        head = done.header
        shard = head.shard_index
        held = self.shard_version(shard)
        if head.mode == "delta" and head.version != held + 1:
            return ApplyResult("gap", held, head.version, shard)
        new_records = self.guard.check_audit(head)
        block = head.block_size
        size = head.total_blocks * block
        # decrypt outside the state lock (the slow part); hand the values over under it
        values = [(b.index, decrypt_block(self.ctx, b.ciphertext)[:block]) for b in done.blocks]
        self.guard.commit(head, new_records, done.chunks)
        with self.owner.edit() as st:
            if st.global_sum.size != size:
                st.global_sum = np.zeros(size)
            if head.mode == "delta":
                target = st.global_sum
            elif self.shard_count == 1:
                target = np.zeros(size)
            else:  # a shard's snapshot replaces that shard's block range only
                target = st.global_sum.copy()
                lo, hi = shard_block_range(shard, head.total_blocks, self.shard_count)
                target[lo * block : hi * block] = 0.0
            for index, v in values:
                target[index * block : (index + 1) * block] = v
            st.global_sum = target
            if self.shard_count == 1:
                st.version = head.version
            else:
                assert st.shard_versions is not None
                st.shard_versions[shard] = head.version
                st.version = sum(st.shard_versions)
            st.value_scale = head.value_scale
        logger.info("applied global version", extra={"version": head.version, "mode": head.mode,
                                                     "blocks": len(done.blocks), "shard": shard})
        return ApplyResult("applied", head.version, head.version, shard)

    def model_vector(self, x0: np.ndarray) -> np.ndarray:
        global_sum, value_scale = self.owner.model_sum()
        return model_vector(x0, global_sum, value_scale)
