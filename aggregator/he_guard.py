"""Checks the aggregator makes on ciphertexts before a chunk enters its WAL.

Two things an aggregator without the secret key can still refuse:

* damaged or foreign ciphertext bytes (truncated, bit-flipped, wrong parameters, wrong seed
  length, another key's id): ``fedmq.shared.ckks.check_ciphertext`` raises a ``WireError`` whose
  reason names the fault, so each lands in the dead-letter queue under its own reason;
* a buffer whose weighted sum could wrap: every site encrypts values with |x| <= the preset's
  ``value_bound``, so a buffer holding U weight units sums to at most U * value_bound, which
  must stay under the preset's headroom (``CkksPreset.fold_units_limit``). An update that would
  push the buffer past it is refused ("headroom") instead of silently corrupting the version.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedmq.shared.ckks import LoadedContext, check_ciphertext
from fedmq.shared.errors import WireError
from fedmq.shared.schema import UpdateChunk


class HeadroomExceeded(WireError):
    reason = "headroom"


def check_chunk_ciphertexts(ctx: LoadedContext, chunk: UpdateChunk) -> None:
    for block in chunk.blocks:
        try:
            check_ciphertext(ctx, block.ciphertext)
        except WireError as exc:
            exc.detail = f"block {block.index}: {exc.detail}"
            raise


def check_headroom(ctx: LoadedContext, buffered_units: Iterable[int], new_units: int) -> None:
    limit = ctx.preset.fold_units_limit
    total = sum(buffered_units) + new_units
    if total > limit:
        raise HeadroomExceeded(
            f"{new_units} weight units on top of the buffer's would make {total} > {limit}, the most "
            f"preset {ctx.preset.name} can sum for values up to {ctx.preset.value_bound:g} without "
            f"wrapping; lower weight_quantum or raise reference_sample_weight"
        )
