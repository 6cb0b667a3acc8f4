"""The aggregator at ResNet-50 scale, in miniature: D held as wire bytes only, checkpoints streamed
(same bytes as before), version chunks encoded at publish time from their own commit's blocks,
and the headroom guard refusing a buffer whose sum could wrap."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from fedmq.aggregator import checkpoint as cpmod
from fedmq.aggregator.blockstore import CiphertextStore
from fedmq.aggregator.engine import AggregatorEngine
from integration.aggregator_helpers import make_federation, random_delta
from fedmq.shared.ckks import decrypt_block, encrypt_block, load_ciphertext, load_context, serialize
from fedmq.shared.codec import decode_global_version, encode
from fedmq.shared.signing import load_public_key, verify_version


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return make_federation(tmp_path_factory.mktemp("fed"))


def test_store_keeps_bytes_only_and_round_trips(fed):
    public = load_context(fed.public_path, require_secret=False)
    data: dict[int, bytes] = {}
    store = CiphertextStore(public, data)
    values = np.linspace(-1, 1, 50)
    store[3] = load_ciphertext(public, encrypt_block(fed.secret, values))
    assert set(data) == {3} and isinstance(data[3], bytes) and len(store) == 1 and 3 in store
    np.testing.assert_allclose(decrypt_block(fed.secret, store[3])[:50], values, atol=1e-6)
    del store[3]
    assert not data


def test_streamed_checkpoint_is_the_same_msgpack_and_round_trips(fed, tmp_path):
    blocks = {i: encrypt_block(fed.secret, np.full(8, float(i))) for i in (5, 1, 9)}
    cp = cpmod.Checkpoint(version=4, value_scale=0.25, config={"mode": "async"}, blocks=blocks,
                          site_seq={"alpha": 3}, recent=[(4, ["alpha:3"])], sites={"alpha": {"x": 1}},
                          wal_segment="wal-000004.log", created_at=12.5)
    expected = msgpack.packb({
        "schema_version": cpmod.CHECKPOINT_SCHEMA_VERSION, "version": 4, "value_scale": 0.25,
        "config": {"mode": "async"}, "blocks": [[i, blocks[i]] for i in sorted(blocks)],
        "site_seq": {"alpha": 3}, "recent": [[4, ["alpha:3"]]], "sites": {"alpha": {"x": 1}},
        "wal_segment": "wal-000004.log", "created_at": 12.5,
    }, use_bin_type=True)
    assert cp.to_bytes() == expected  # any tool that read the old format reads this one
    cpmod.save(tmp_path, cp)
    assert (tmp_path / cpmod.CHECKPOINT_FILE).read_bytes() == expected
    back = cpmod.load(tmp_path)
    assert back is not None and back.blocks == blocks and back.version == 4 and back.recent == [(4, ["alpha:3"])]
    (tmp_path / cpmod.CHECKPOINT_FILE).write_bytes(expected[:-7])  # torn: refused, not half-loaded
    with pytest.raises(Exception):
        cpmod.load(tmp_path)


def test_version_messages_carry_their_own_commit(fed, tmp_path):
    """A delta encoded lazily still carries the blocks of the commit that made it, even after a
    later commit replaced D's bytes (the messages of a replay are published after it)."""
    eng = AggregatorEngine(fed.settings(tmp_path / "s", buffer_size=1))
    rng = np.random.default_rng(1)
    try:
        outs1 = []
        for b in fed.update("alpha", 1, 0, random_delta(rng, fed.n_params))[0]:
            outs1 += eng.handle_chunk(b)[1]
        first = {blk.index: blk.ciphertext for o in outs1 for blk in decode_global_version(o.body).blocks}
        for b in fed.update("bravo", 1, 1, random_delta(rng, fed.n_params))[0]:
            eng.handle_chunk(b)
        assert eng.version == 2
        again = {blk.index: blk.ciphertext for o in outs1 for blk in decode_global_version(o.body).blocks}
        assert again == first and any(first[i] != eng.D.data[i] for i in first)
        assert all(o.body == encode(o.chunk) for o in outs1)
        # signed when published (on the connection thread), by the aggregator's key, over the
        # blocks of its own commit
        key = load_public_key(fed.keys_dir / "aggregator.hybrid.pub")
        for o in outs1:
            verify_version(decode_global_version(o.body), key)
        # D in memory is bytes only; reading it decrypts to the stored sum
        i = next(iter(eng.D))
        np.testing.assert_allclose(decrypt_block(fed.secret, eng.D[i]), decrypt_block(fed.secret, eng.D.data[i]))
        assert serialize(eng.D[i]) == eng.D.data[i]
    finally:
        eng.close()


def test_headroom_guard_refuses_a_buffer_that_could_wrap(fed, tmp_path):
    # w_ref = 1 configured: the mean-of-reports default keeps every factor <= n_sites, so only a
    # misconfigured reference weight can reach the limit, and that is what the guard is for
    eng = AggregatorEngine(fed.settings(tmp_path / "h", buffer_size=3, reference_sample_weight=1.0))
    try:
        limit = eng.ctx.preset.fold_units_limit
        big = limit / 64 * 0.6  # 60% of the limit's units with Q = 64
        rng = np.random.default_rng(2)
        for b in fed.update("alpha", 1, 0, random_delta(rng, fed.n_params), sample_weight=big)[0]:
            assert eng.handle_chunk(b)[0].action == "accept"
        d, _ = eng.handle_chunk(fed.update("bravo", 1, 0, random_delta(rng, fed.n_params), sample_weight=big)[0][0])
        assert d.action == "reject" and d.reason == "headroom" and "reference_sample_weight" in d.detail
        assert eng.version == 0 and eng.updates_folded_total == 1
    finally:
        eng.close()
