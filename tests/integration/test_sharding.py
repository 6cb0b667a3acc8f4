"""Sharded aggregation (docs/sharding.md): two aggregator shards on a real broker, sites that split
each update per shard, and a site-side receiver that tracks one version per shard. The decrypted
global model must equal a plaintext FedBuff replay of exactly the updates each shard folded."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest

from fedmq.aggregator.fold import weight_units
from fedmq.shared.sharding import owned_blocks
from fedmq.broker.topology import (
    CONTROL_EXCHANGE, EXCHANGES, GLOBAL_EXCHANGE, SITE_DIRECT_EXCHANGE, SNAPSHOT_REQUEST_KEY, aggregator_queue_specs,
    declare, shard_key,
)
from integration.aggregator_helpers import (
    LAYOUT_FP, SLOTS, AggregatorThread, PlainReplay, connect, drain_dead_letters, make_federation, publish,
    random_delta,
)
from fedmq.shared.codec import decode_global_version, decode_update_chunk, encode_snapshot_request, encode_update_chunk
from fedmq.shared.schema import SnapshotRequest, UpdateChunk
from fedmq.shared.signing import AGGREGATOR_KEY_NAME, load_public_key, public_key_path
from fedmq.site_agent.global_model import GlobalModelReceiver
from fedmq.site_agent.version_guard import VersionGuard
from fedmq.site_agent.state import SiteState, SiteStateStore
from fedmq.site_agent.update_builder import UpdateIdentity, build_update, shard_of_encoded

N_SHARDS = 2


def _build(fed, site, seq, bases, delta, *, mode="dense", fraction=0.5, sample_weight=1.0):
    """Encoded chunks per shard + the plaintext blocks sent (index -> values)."""
    built = build_update(
        delta, None, UpdateIdentity(site, seq, sum(bases), sample_weight), fed.secret, LAYOUT_FP,
        fed.signing[site], mode=mode, fraction=fraction, max_message_bytes=256 * 1024, shard_base_versions=tuple(bases),
    )
    padded = np.zeros(fed.total_blocks * SLOTS)
    padded[: delta.size] = delta
    sent = {i: padded[i * SLOTS : (i + 1) * SLOTS].copy() for i in built.sent_indices}
    return [encode_update_chunk(c) for c in built.chunks], sent


# ------------------------------------------------------------------------- no broker needed


def test_split_per_shard_and_single_shard_unchanged(tmp_path):
    fed = make_federation(tmp_path, sites=("alpha",), n_params=6 * SLOTS + 100)
    delta = random_delta(np.random.default_rng(0), fed.n_params)
    bodies, sent = _build(fed, "alpha", 7, (3, 5), delta, mode="topk", fraction=0.5)
    chunks = [decode_update_chunk(b, max_bytes=1 << 22) for b in bodies]
    by_shard: dict[int, list[UpdateChunk]] = {}
    for raw, c in zip(bodies, chunks):
        assert shard_of_encoded(raw) == c.shard_index
        by_shard.setdefault(c.shard_index, []).append(c)
    assert sorted(by_shard) == [0, 1]  # every shard gets a sub-update, even an empty one
    for shard, cs in by_shard.items():
        owned = set(owned_blocks(fed.total_blocks, shard, N_SHARDS))
        assert {c.update_id for c in cs} == {f"alpha:7:s{shard}"}
        assert {c.base_version for c in cs} == {(3, 5)[shard]}
        assert all(c.shard_count == N_SHARDS and set(c.block_indices) <= owned for c in cs)
    assert sorted(i for cs in by_shard.values() for i in cs[0].block_indices) == sorted(sent)

    # one shard: the wire form carries no shard field at all (old peers see the same bytes)
    one, _ = fed.update("alpha", 8, 2, delta)
    assert all("shard_index" not in msgpack.unpackb(b) and "shard_count" not in msgpack.unpackb(b) for b in one)
    assert {decode_update_chunk(b, max_bytes=1 << 22).update_id for b in one} == {"alpha:8"}


def test_site_state_keeps_shard_versions_and_loads_old_files(tmp_path):
    store = SiteStateStore(tmp_path / "s")
    st = SiteState("alpha", "key-fp-00000000", LAYOUT_FP, version=4)
    store.save(st)  # an unsharded state file: no shard_versions key
    old = store.load("alpha", "key-fp-00000000", LAYOUT_FP)
    assert old.version == 4 and old.shard_versions is None
    old.shard_versions = [2, 3]
    old.version = 5
    store.save(old)
    again = store.load("alpha", "key-fp-00000000", LAYOUT_FP)
    assert again.shard_versions == [2, 3] and again.version == 5


# ------------------------------------------------------------------------- on a real broker


class RawGlobalListener:
    """Every global-version chunk, decoded, in arrival order (fanout + one site's direct key)."""

    def __init__(self, url: str, site: str) -> None:
        self.conn = connect(url)
        self.ch = self.conn.channel()
        declare(self.ch, EXCHANGES, ())
        self.queue = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.queue, GLOBAL_EXCHANGE, "")
        self.ch.queue_bind(self.queue, SITE_DIRECT_EXCHANGE, site)
        self.chunks: list = []

    def poll(self, seconds: float = 0.2) -> None:
        deadline = time.monotonic() + seconds
        while True:
            method, _props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                if time.monotonic() >= deadline:
                    return
                self.conn.process_data_events(time_limit=0.05)
                continue
            self.chunks.append(decode_global_version(body, max_bytes=64 << 20))

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


@pytest.mark.broker
def test_two_shards_fold_to_the_plaintext_replay(tmp_path, amqp_url):
    fed = make_federation(tmp_path, n_params=6 * SLOTS + 100)  # 7 blocks: shard 0 owns 0-3, shard 1 owns 4-6
    conn = connect(amqp_url)
    declare(conn.channel(), EXCHANGES, aggregator_queue_specs(N_SHARDS))
    conn.close()
    settings = [
        fed.settings(tmp_path / f"state-{i}", amqp_url=amqp_url, shard_index=i, shard_count=N_SHARDS,
                     buffer_size=3, max_staleness=8, snapshot_every=2, reference_sample_weight=1.0)
        for i in range(N_SHARDS)
    ]
    listener = RawGlobalListener(amqp_url, site="alpha")
    state = SiteState("alpha", fed.secret.fingerprint, LAYOUT_FP)
    # one audit chain per shard, each checked against the aggregator key the shards share
    guard = VersionGuard(load_public_key(public_key_path(fed.keys_dir, AGGREGATOR_KEY_NAME)), tmp_path / "site",
                         shard_count=N_SHARDS)
    receiver = GlobalModelReceiver(state, fed.secret, LAYOUT_FP, fed.n_params, shard_count=N_SHARDS, guard=guard)
    rng = np.random.default_rng(5)
    weight = {"alpha": 1.0, "bravo": 2.0, "charlie": 0.5}
    sent_by_uid: dict[str, dict[int, np.ndarray]] = {}
    seq = {s: 0 for s in fed.sites}

    deltas: dict[tuple[int, int], tuple] = {}  # (shard, version) -> contributors

    def pump() -> None:
        listener.poll(0.3)
        while listener.chunks:
            chunk = listener.chunks.pop(0)
            if chunk.mode == "delta":
                deltas[(chunk.shard_index, chunk.version)] = chunk.contributors
            receiver.offer(chunk)

    try:
        with AggregatorThread(settings[0]) as agg0, AggregatorThread(settings[1]) as agg1:
            prev_start = start = receiver.versions()
            for rnd in range(3):
                prev_start, start = start, receiver.versions()
                for site in fed.sites:
                    seq[site] += 1
                    # the site's version of each shard when it "trains"; charlie is one version behind
                    bases = prev_start if site == "charlie" else receiver.versions()
                    mode = "topk" if site == "bravo" else "dense"
                    bodies, sent = _build(fed, site, seq[site], bases, random_delta(rng, fed.n_params),
                                          mode=mode, fraction=0.3, sample_weight=weight[site])
                    for raw in bodies:
                        publish(amqp_url, [raw], routing_key=shard_key(shard_of_encoded(raw)))
                    for shard in range(N_SHARDS):
                        owned = set(owned_blocks(fed.total_blocks, shard, N_SHARDS))
                        sent_by_uid[f"{site}:{seq[site]}:s{shard}"] = {i: v for i, v in sent.items() if i in owned}
                    pump()
                deadline = time.monotonic() + 60
                while receiver.versions() != (rnd + 1, rnd + 1) and time.monotonic() < deadline:
                    pump()
                assert receiver.versions() == (rnd + 1, rnd + 1), receiver.versions()
            assert state.version == 6
            assert [c.head for c in guard.chains] == [3, 3]
            assert agg0.engine.version == agg1.engine.version == 3

            # each shard holds only its own blocks and folded only its own sub-updates
            for shard, agg in enumerate((agg0, agg1)):
                assert set(agg.engine.D) <= set(owned_blocks(fed.total_blocks, shard, N_SHARDS))
                assert all(uid.endswith(f":s{shard}") for _v, ids in agg.engine.recent for uid in ids)
            # plaintext FedBuff replay of the contributors every shard's deltas named
            scale = agg0.engine.value_scale
            plain = PlainReplay()
            assert sorted(deltas) == [(s, v) for s in range(N_SHARDS) for v in (1, 2, 3)]
            for (_shard, _v), contributors in sorted(deltas.items()):
                assert len(contributors) == 3
                for c in contributors:
                    assert c.weight_units == weight_units(c.staleness, c.sample_weight, quantum=64, exponent=0.5,
                                                          reference_sample_weight=1.0)
                    plain.fold(sent_by_uid[c.update_id], c.weight_units)
            assert any(c.staleness > 0 for cs in deltas.values() for c in cs)
            got = fed.model({i: ct for agg in (agg0, agg1) for i, ct in agg.engine.D.data.items()}, scale)
            expected = plain.model(fed.n_params, scale)
            np.testing.assert_allclose(got, expected, atol=1e-6)
            # the site-side receiver (deltas + periodic snapshots per shard) holds the same model
            site_model = receiver.model_vector(np.zeros(fed.n_params))
            np.testing.assert_allclose(site_model, expected, atol=1e-6)

            # a snapshot request carries its shard; shard 0 (the control-queue consumer) answers its own
            publish(amqp_url, [encode_snapshot_request(SnapshotRequest(site_id="alpha", have_version=0,
                                                                       reason="gap", shard_index=0))],
                    exchange=CONTROL_EXCHANGE, routing_key=SNAPSHOT_REQUEST_KEY)
            deadline = time.monotonic() + 20
            direct = []
            while not direct and time.monotonic() < deadline:
                listener.poll(0.3)
                direct = [c for c in listener.chunks if c.target_site == "alpha"]
            assert direct and all(c.shard_index == 0 and c.shard_count == N_SHARDS for c in direct)

            # a sub-update sent to the wrong shard's queue is dead-lettered as wrong-shard
            seq["alpha"] += 1
            bodies, _ = _build(fed, "alpha", seq["alpha"], receiver.versions(), random_delta(rng, fed.n_params))
            wrong = [raw for raw in bodies if shard_of_encoded(raw) == 1]
            publish(amqp_url, wrong, routing_key=shard_key(0))
            reasons = [h.get("x-fedmq-reason") for h, _ in drain_dead_letters(amqp_url, len(wrong))]
            assert reasons == ["wrong-shard"] * len(wrong)
    finally:
        listener.close()
