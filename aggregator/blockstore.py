"""The committed global sum D_v, held as wire bytes only.

A SEAL ciphertext in memory takes 64 kB per 4096 values, its wire form 50 kB; the engine needs
the wire form anyway (checkpoints, versions), so keeping both doubled the aggregator's memory at
ResNet-50 scale. ``CiphertextStore`` is the mapping the fold code commits into: reading a block
loads it from its bytes, writing one serializes it, and nothing else stays in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

from fedmq.shared.ckks import HeVector, LoadedContext, load_ciphertext, serialize


class CiphertextStore(MutableMapping[int, HeVector]):
    def __init__(self, ctx: LoadedContext, data: dict[int, bytes]) -> None:
        self.ctx = ctx
        #: block index -> wire bytes; shared with the engine, which checkpoints and publishes them
        self.data = data

    def __getitem__(self, index: int) -> HeVector:
        # bytes this store serialized itself, or checked when the checkpoint was loaded
        return load_ciphertext(self.ctx, self.data[index], checked=True)

    def __setitem__(self, index: int, vec: HeVector) -> None:
        self.data[index] = serialize(vec)

    def __delitem__(self, index: int) -> None:
        del self.data[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, index: object) -> bool:
        return index in self.data
