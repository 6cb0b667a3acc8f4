"""fedmq.shared.chunking: chunks stay under the size limit and reassemble, in any order, to the same blocks."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.shared.chunking import Assembled, ChunkAssembler, chunk_blocks
from fedmq.shared.codec import decode_global_version, decode_update_chunk, encode
from fedmq.shared.errors import ChunkError, DuplicateChunk, InconsistentChunk, MessageTooLarge, MissingChunk
from fedmq.shared.schema import EncryptedBlock, GlobalVersionChunk, UpdateChunk


def template(total_blocks: int, **changes: object) -> UpdateChunk:
    fields = dict(
        chunk_index=0, chunk_count=1, block_size=2048, total_blocks=total_blocks, block_indices=(), blocks=(),
        key_fingerprint="n4096-q54:0123456789abcdef", layout_fingerprint="f" * 32, site_id="site-a",
        update_id="site-a:7", seq=7, base_version=3, sample_weight=120.0, sparsity_mode="topk",
        sparsity_fraction=0.5, created_at=1700000000.0,
    )
    fields.update(changes)
    return UpdateChunk(**fields)


def gv_template(total_blocks: int) -> GlobalVersionChunk:
    return GlobalVersionChunk(
        chunk_index=0, chunk_count=1, block_size=2048, total_blocks=total_blocks, block_indices=(), blocks=(),
        key_fingerprint="n4096-q54:0123456789abcdef", layout_fingerprint="f" * 32, version=5, mode="delta",
        value_scale=1e-3, created_at=1.0, weight_units_sum=17,
    )


@st.composite
def block_sets(draw: st.DrawFn) -> tuple[int, list[EncryptedBlock]]:
    total = draw(st.integers(1, 400))
    indices = draw(st.lists(st.integers(0, total - 1), min_size=0, max_size=min(total, 60), unique=True))
    sizes = draw(st.lists(st.integers(1, 3000), min_size=len(indices), max_size=len(indices)))
    return total, [EncryptedBlock(index=i, ciphertext=bytes([i % 251]) * n) for i, n in zip(indices, sizes)]


def _key(c: UpdateChunk | GlobalVersionChunk) -> str:
    return getattr(c, "update_id", None) or f"v{c.version}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block_sets(), st.integers(8_000, 40_000), st.randoms(use_true_random=False), st.booleans())
def test_chunks_fit_and_reassemble_in_any_order(bs: tuple, max_bytes: int, rnd, global_version: bool) -> None:
    total, blocks = bs
    tmpl = gv_template(total) if global_version else template(total)
    chunks = chunk_blocks(tmpl, blocks, max_bytes)
    assert chunks and all(c.chunk_count == len(chunks) for c in chunks)
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    indices = tuple(sorted(b.index for b in blocks))
    for c in chunks:
        assert c.block_indices == indices
        # the worst case: a hybrid signature (at most 4 KiB) is added after chunking
        final = c.model_copy(update={"signature": b"\xff" * 4096})
        data = encode(final)
        assert len(data) <= max_bytes
        decoded = (decode_global_version if global_version else decode_update_chunk)(data, max_bytes)
        assert decoded == final
    shuffled = list(chunks)
    rnd.shuffle(shuffled)
    asm: ChunkAssembler = ChunkAssembler(_key)
    results = [asm.add(c) for c in shuffled]
    assert all(r is None for r in results[:-1])
    done = results[-1]
    assert isinstance(done, Assembled)
    assert done.blocks == tuple(sorted(blocks, key=lambda b: b.index))
    assert done.header.chunk_index == 0 and done.chunks == tuple(chunks)
    assert len(asm) == 0


def test_many_chunks_when_blocks_are_big() -> None:
    blocks = [EncryptedBlock(index=i, ciphertext=b"x" * 60_000) for i in range(20)]
    chunks = chunk_blocks(template(20), blocks, 200_000)
    assert len(chunks) == 7  # three 60 kB blocks fit a 200 kB message
    assert all(len(encode(c.model_copy(update={"signature": b"s" * 64}))) <= 200_000 for c in chunks)


def test_a_block_larger_than_the_limit_is_refused() -> None:
    with pytest.raises(MessageTooLarge):
        chunk_blocks(template(1), [EncryptedBlock(index=0, ciphertext=b"x" * 10_000)], 8_000)


def test_no_blocks_is_one_empty_chunk() -> None:
    (chunk,) = chunk_blocks(template(4), [], 10_000)
    assert chunk.blocks == () and chunk.block_indices == ()
    done = ChunkAssembler(_key).add(chunk)
    assert done is not None and done.blocks == ()


def _three_chunks() -> list[UpdateChunk]:
    blocks = [EncryptedBlock(index=i, ciphertext=b"c" * 3_000) for i in (0, 2, 5, 7, 9, 11)]
    chunks = chunk_blocks(template(12), blocks, 11_000)  # 2 blocks + header + signature reserve
    assert len(chunks) == 3
    return chunks


def test_duplicate_chunk() -> None:
    a, b, _ = _three_chunks()
    asm: ChunkAssembler = ChunkAssembler(_key)
    assert asm.add(a) is None
    with pytest.raises(DuplicateChunk) as info:
        asm.add(a)
    assert info.value.reason == "duplicate-chunk"
    assert asm.add(b) is None  # the message is still being assembled


def test_missing_chunk_expires() -> None:
    a, _, c = _three_chunks()
    asm: ChunkAssembler = ChunkAssembler(_key)
    asm.add(a)
    asm.add(c)
    assert asm.expire(60.0) == []  # not yet
    expired = asm.expire(60.0, now=time.monotonic() + 61)
    assert [k for k, _ in expired] == ["site-a:7"]
    err = expired[0][1]
    assert isinstance(err, MissingChunk) and err.reason == "incomplete" and "[1]" in str(err)
    assert len(asm) == 0


@pytest.mark.parametrize(
    "change",
    [{"seq": 8}, {"sample_weight": 1.0}, {"base_version": 4}, {"total_blocks": 13}, {"layout_fingerprint": "e" * 32},
     {"key_fingerprint": "n4096-q54:ffffffffffffffff"}, {"chunk_count": 4}, {"block_indices": (0, 2, 5, 7, 9)}],
    ids=lambda c: next(iter(c)),
)
def test_inconsistent_chunk(change: dict) -> None:
    a, b, _ = _three_chunks()
    asm: ChunkAssembler = ChunkAssembler(_key)
    asm.add(a)
    altered = UpdateChunk.model_validate({**b.model_dump(), **change})
    with pytest.raises(InconsistentChunk) as info:
        asm.add(altered)
    assert info.value.reason == "inconsistent-chunk"


def test_undeclared_or_repeated_block_is_inconsistent() -> None:
    a, b, c = _three_chunks()
    asm: ChunkAssembler = ChunkAssembler(_key)
    asm.add(a)
    moved = b.model_copy(update={"blocks": b.blocks + (a.blocks[0],)})  # block 0 again
    with pytest.raises(InconsistentChunk):
        asm.add(moved)
    # a bad FIRST chunk leaves nothing pending behind
    fresh: ChunkAssembler = ChunkAssembler(_key)
    bogus = a.model_copy(update={"blocks": (EncryptedBlock(index=1, ciphertext=b"x"),)})
    with pytest.raises(InconsistentChunk):
        fresh.add(bogus)
    assert len(fresh) == 0


def test_chunk_dropping_a_block_is_caught_at_completion() -> None:
    a, b, c = _three_chunks()
    asm: ChunkAssembler = ChunkAssembler(_key)
    asm.add(a)
    asm.add(b.model_copy(update={"blocks": b.blocks[:1]}))
    with pytest.raises(InconsistentChunk):
        asm.add(c)


def test_pending_messages_are_bounded() -> None:
    asm: ChunkAssembler = ChunkAssembler(_key, max_pending=2)
    for seq in (1, 2):
        a, _, _ = _three_chunks()
        asm.add(a.model_copy(update={"update_id": f"site-a:{seq}"}))
    a, _, _ = _three_chunks()
    with pytest.raises(ChunkError):
        asm.add(a.model_copy(update={"update_id": "site-a:3"}))
    asm.discard("site-a:1")
    asm.add(a.model_copy(update={"update_id": "site-a:3"}))
    assert sorted(asm.pending_keys()) == ["site-a:2", "site-a:3"]
