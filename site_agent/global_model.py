"""Applies global versions from the aggregator, in order, and notices gaps.

The site keeps D_v decrypted; the model is x_v = x_0 + value_scale * D_v. Delta messages
carry the new D value of each changed block, snapshots every non-zero block, so a site that
applied deltas and one that loaded a snapshot hold bit-identical weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from shared.chunking import Assembled, ChunkAssembler
from shared.ckks import LoadedContext, decrypt_block
from shared.errors import KeyMismatch, LayoutMismatch
from shared.schema import GlobalVersionChunk
from site_agent.model_state import model_vector
from site_agent.state import SiteState

logger = logging.getLogger(__name__)

Outcome = Literal["applied", "old", "gap", "incomplete", "not-for-us"]


@dataclass(frozen=True)
class ApplyResult:
    outcome: Outcome
    version: int
    message_version: int


def version_key(chunk: GlobalVersionChunk) -> str:
    return f"{chunk.version}:{chunk.mode}:{chunk.target_site or '*'}"


class GlobalModelReceiver:
    def __init__(self, state: SiteState, ctx: LoadedContext, layout_fingerprint: str, model_size: int) -> None:
        self.state = state
        self.ctx = ctx
        self.layout_fingerprint = layout_fingerprint
        self.model_size = model_size
        self.assembler: ChunkAssembler[GlobalVersionChunk] = ChunkAssembler(version_key, max_pending=16)

    def offer(self, chunk: GlobalVersionChunk) -> ApplyResult:
        """Feed one chunk; returns what happened once its version is complete."""
        if chunk.target_site is not None and chunk.target_site != self.state.site_id:
            return ApplyResult("not-for-us", self.state.version, chunk.version)
        if chunk.key_fingerprint != self.ctx.fingerprint:
            raise KeyMismatch(f"global version under key {chunk.key_fingerprint}, ours is {self.ctx.fingerprint}")
        if chunk.layout_fingerprint != self.layout_fingerprint:
            raise LayoutMismatch(f"global version for layout {chunk.layout_fingerprint}")
        if chunk.version <= self.state.version:
            # Nothing newer; still consume the chunks so a partial set never lingers.
            self.assembler.discard(version_key(chunk))
            return ApplyResult("old", self.state.version, chunk.version)
        done = self.assembler.add(chunk)
        if done is None:
            return ApplyResult("incomplete", self.state.version, chunk.version)
        return self._apply(done)

    def _apply(self, done: Assembled[GlobalVersionChunk]) -> ApplyResult:
        head = done.header
        if head.mode == "delta" and head.version != self.state.version + 1:
            return ApplyResult("gap", self.state.version, head.version)
        block = head.block_size
        size = head.total_blocks * block
        if self.state.global_sum.size != size:
            self.state.global_sum = np.zeros(size)
        target = self.state.global_sum if head.mode == "delta" else np.zeros(size)
        for b in done.blocks:
            target[b.index * block : (b.index + 1) * block] = decrypt_block(self.ctx, b.ciphertext)[:block]
        self.state.global_sum = target
        self.state.version = head.version
        self.state.value_scale = head.value_scale
        logger.info("applied global version", extra={"version": head.version, "mode": head.mode, "blocks": len(done.blocks)})
        return ApplyResult("applied", head.version, head.version)

    def model_vector(self, x0: np.ndarray) -> np.ndarray:
        return model_vector(x0, self.state.global_sum, self.state.value_scale)
