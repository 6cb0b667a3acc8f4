"""Pure fold maths: staleness weights, integer weight units, folding and committing.

Nothing here touches a broker or a file. Ciphertext operations go through the HE seam
(``shared.ckks``): an exact integer scaling and additions, so no multiplicative level is consumed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping

import numpy as np

from fedmq.aggregator.blockstore import CiphertextStore
from fedmq.shared.ckks import HeVector, accumulate, add_inplace


def staleness_weight(tau: int, exponent: float) -> float:
    """s(tau) = (1 + tau)^-a."""
    if tau < 0:
        raise ValueError("staleness must be >= 0")
    return float((1.0 + tau) ** (-exponent))


def weight_units(
    tau: int,
    sample_weight: float,
    *,
    quantum: int,
    exponent: float,
    reference_sample_weight: float,
) -> int:
    """m = max(1, round(Q * s(tau) * w / w_ref)): the integer the update is multiplied by."""
    raw = quantum * staleness_weight(tau, exponent) * sample_weight / reference_sample_weight
    return max(1, int(round(raw)))


def value_scale(server_lr: float, quantum: int, buffer_size: int) -> float:
    """x_v = x_0 + value_scale * decrypt(D_v): server_lr / (Q * K)."""
    return float(server_lr) / (quantum * buffer_size)




def fold_into(
    buffer: MutableMapping[int, HeVector],
    blocks: Iterable[tuple[int, HeVector]],
    units: int,
) -> list[int]:
    """buffer[b] += units * ct_b for each block. The given vectors must be owned by the caller
    (freshly deserialized): they may end up inside ``buffer``. Returns the touched indices."""
    touched = []
    for index, vec in blocks:
        buffer[index] = accumulate(buffer.get(index), vec, units)  # buffer entries are vectors we own
        touched.append(index)
    return touched


def commit(state: MutableMapping[int, HeVector], buffer: MutableMapping[int, HeVector]) -> list[int]:
    """D[b] += buffer[b] for touched blocks; empties the buffer (block by block, so a large buffer's
    memory is given back while D is written); returns changed indices (sorted)."""
    changed = sorted(buffer)
    if isinstance(state, CiphertextStore):  # D as wire bytes: added there, on two cores if it can
        state.add_all((index, buffer.pop(index)) for index in changed)
        return changed
    for index in changed:
        vec = buffer.pop(index)
        current = state.get(index)
        state[index] = vec if current is None else add_inplace(current, vec)
    return changed


# --- plaintext mirror, used by tests and docs to check the encrypted path -----------------


def fold_plain(buffer: dict[int, np.ndarray], blocks: Mapping[int, np.ndarray], units: int) -> None:
    for index, values in blocks.items():
        buffer[index] = buffer.get(index, 0.0) + units * np.asarray(values, dtype=np.float64)


def commit_plain(state: dict[int, np.ndarray], buffer: dict[int, np.ndarray]) -> list[int]:
    changed = sorted(buffer)
    for index in changed:
        state[index] = state.get(index, 0.0) + buffer[index]
    buffer.clear()
    return changed


def reconstruct(
    x0: np.ndarray, state: Mapping[int, np.ndarray], scale: float, block_size: int
) -> np.ndarray:
    """x_v = x_0 + value_scale * D_v, D given as decrypted (or plaintext) blocks."""
    x = np.array(x0, dtype=np.float64, copy=True)
    for index, values in state.items():
        lo = index * block_size
        hi = min(lo + block_size, x.size)
        if lo < x.size:
            x[lo:hi] += scale * np.asarray(values, dtype=np.float64)[: hi - lo]
    return x
