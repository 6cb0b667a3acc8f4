"""A site agent on the real broker refuses every global version the aggregator did not sign as
the next link of its audit chain, names the version, counts the refusal and keeps its model.

The attacker here holds the broker (or a queue): it can publish anything on the fanout or a
site's queue. Good versions come from a real ``AggregatorEngine``; bad ones are those versions
altered, stripped, re-signed with another key, replayed or replaced by older ones. Where a
case needs a chunk the aggregator did sign (so that only the audit record is wrong), the test
re-signs it with the aggregator's key: that models a compromised or buggy aggregator, which
the chain still catches.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fedmq.aggregator.engine import AggregatorEngine
from fedmq.broker import topology
from integration.aggregator_helpers import declare_topology, make_federation, publish
from fedmq.shared.audit import decode_record, sign_record
from fedmq.shared.cli import main
from fedmq.shared.codec import decode_global_version, encode
from fedmq.shared.signing import (
    AGGREGATOR_KEY_NAME,
    load_private_key,
    new_signing_key,
    private_key_path,
    public_key_path,
    sign_version,
)
from fedmq.site_agent.model_state import FederatedModel
from fedmq.site_agent.service import SiteAgent
from fedmq.site_agent.settings import SiteSettings
from testkit.polling import wait_until

pytestmark = pytest.mark.broker

SITE = "alpha"


def _deltas(engine: AggregatorEngine, fed, layout, n: int) -> tuple[dict[int, list[bytes]], dict[int, list[bytes]]]:  # type: ignore[no-untyped-def]
    """n versions from the real engine (one update each): delta and snapshot bodies per version."""
    rng = np.random.default_rng(3)
    deltas, snaps = {}, {}
    for v in range(1, n + 1):
        bodies, _ = fed.update(SITE, v, v - 1, rng.uniform(-0.1, 0.1, layout.size), layout_fp=layout.fingerprint,
                               mode="topk", fraction=0.25)
        out = []
        for body in bodies:
            out += engine.handle_chunk(body)[1]
        deltas[v] = [o.body for o in out if o.kind == "delta"]
        snaps[v] = [o.body for o in engine.snapshot()]
    return deltas, snaps


def _resign(body: bytes, key, **change) -> bytes:  # type: ignore[no-untyped-def]
    chunk = decode_global_version(body).model_copy(update={"signature": b"", **change})
    return encode(sign_version(chunk, key))


def _strip(body: bytes, half: str) -> bytes:
    chunk = decode_global_version(body)
    sig = msgpack.unpackb(chunk.signature, raw=False)
    del sig[half]
    return encode(chunk.model_copy(update={"signature": msgpack.packb(sig, use_bin_type=True)}))


def _strip_record(record: bytes, half: str) -> bytes:
    rec = decode_record(record)
    sig = msgpack.unpackb(rec.signature, raw=False)
    del sig[half]
    return encode(rec.model_copy(update={"signature": msgpack.packb(sig, use_bin_type=True)}))


class _Site:
    def __init__(self, agent: SiteAgent) -> None:
        self.agent = agent
        self.thread = threading.Thread(target=agent.run, daemon=True)

    def wait(self, pred, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
        wait_until(pred, what, timeout)


@pytest.fixture
def setup(tmp_path: Path, amqp_url: str):  # type: ignore[no-untyped-def]
    fed = make_federation(tmp_path, sites=(SITE,), n_params=FederatedModel.create("small_cnn", 0).layout.size)
    layout = FederatedModel.create("small_cnn", 0).layout
    engine = AggregatorEngine(fed.settings(tmp_path / "agg", buffer_size=1, snapshot_every=0))
    deltas, snaps = _deltas(engine, fed, layout, 3)
    agg_key = load_private_key(private_key_path(fed.keys_dir, AGGREGATOR_KEY_NAME))
    declare_topology(amqp_url)
    # the site's queue exists before anything is published (the agent declares the same one)
    from integration.aggregator_helpers import connect

    conn = connect(amqp_url)
    topology.declare(conn.channel(), (), (topology.site_queue_spec(SITE),))
    conn.close()
    settings = SiteSettings(
        site_id=SITE, amqp_url=amqp_url, secret_context=fed.keys_dir / "site-secret.ckks",
        signing_key=private_key_path(fed.site_keys_dir, SITE), manifest=tmp_path / "unused.csv",
        state_dir=tmp_path / "site", aggregator_public_key=public_key_path(fed.keys_dir, AGGREGATOR_KEY_NAME),
        log_json=False, progress_bars=False, reconnect_initial_s=0.2,
    )
    from fedmq.site_agent.runtime import SiteRuntime

    site = _Site(SiteAgent(settings, SiteRuntime.open(settings, load_data=False)))
    site.thread.start()
    try:
        site.wait(site.agent.connected.is_set, "the site agent to connect")
        yield fed, engine, deltas, snaps, agg_key, site, amqp_url
    finally:
        site.agent.stop()
        site.thread.join(30)
        engine.close()


def test_site_refuses_bad_versions_and_audit_chains(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    fed, engine, deltas, snaps, agg_key, site, url = setup
    caplog.set_level(logging.ERROR, logger="fedmq.site_agent.service")
    agent = site.agent

    class _Held:  # what the site holds now, read through its state owner
        version = property(lambda self: agent.rt.state.version)
        global_sum = property(lambda self: agent.rt.owner.model_sum()[0])

    state = _Held()

    def send(bodies: list[bytes]) -> None:
        publish(url, bodies, exchange=topology.GLOBAL_EXCHANGE, routing_key="")

    def refused(bodies: list[bytes], reason: str, text: str) -> None:
        before = agent.version_metrics.counts.get(reason, 0)
        version, model = state.version, state.global_sum.copy()
        caplog.clear()
        send(bodies)
        site.wait(lambda: agent.version_metrics.counts.get(reason, 0) > before, f"a {reason} refusal")
        assert state.version == version and np.array_equal(state.global_sum, model), "the last good model is kept"
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert reason in logged and text in logged, logged

    send(deltas[1])
    site.wait(lambda: state.version == 1, "version 1 applied")
    held = state.global_sum.copy()
    assert agent.guard.chains[0].head == 1

    d2 = deltas[2][0]
    rec2 = decode_global_version(d2).audit[0]
    refused([encode(decode_global_version(d2).model_copy(update={"signature": b""}))], "unsigned-version", "global version 2 (delta) is unsigned")
    refused([_resign(d2, new_signing_key())], "bad-version-signature", "global version 2")
    refused([_strip(d2, "ml-dsa-65")], "bad-version-signature", "global version 2 (delta, chunk 0): ML-DSA-65 signature missing")
    refused([_strip(d2, "ed25519")], "bad-version-signature", "global version 2 (delta, chunk 0): Ed25519 signature missing")
    forged = decode_global_version(d2).model_copy(update={"value_scale": 9.0})  # altered after signing
    refused([encode(forged)], "bad-version-signature", "Ed25519 signature does not verify")
    refused(deltas[1], "replayed-version", "global version 1 (delta, chunk 0) was already applied (replay)")

    # every chunk is signed by the aggregator; only the audit record they carry is wrong
    def with_audit(*records: bytes) -> list[bytes]:
        return [_resign(b, agg_key, audit=records) for b in deltas[2]]

    tampered = decode_record(rec2).model_copy(update={"contributions": ()})  # hide who contributed
    refused(with_audit(encode(tampered)), "audit-signature", "global version 2 (delta)")
    wrong_key = sign_record(decode_record(rec2).model_copy(update={"signature": b""}), new_signing_key())
    refused(with_audit(encode(wrong_key)), "audit-signature", "Ed25519 signature does not verify")
    refused(with_audit(_strip_record(rec2, "ml-dsa-65")), "audit-signature",
            "audit record of version 2: ML-DSA-65 signature missing")
    refused(with_audit(_strip_record(rec2, "ed25519")), "audit-signature",
            "audit record of version 2: Ed25519 signature missing")
    refused(with_audit(), "audit-missing", "global version 2 (delta) carries no audit record")
    s3 = snaps[3]
    rec3 = decode_global_version(s3[0]).audit[-1]
    refused([_resign(b, agg_key, audit=(rec3,)) for b in s3], "audit-gap",
            "records 2..2 missing")  # a snapshot whose chain skips version 2
    refused([_resign(b, agg_key, audit=(rec3, rec2)) for b in s3], "audit-fork", "reordered chain")
    assert np.array_equal(state.global_sum, held)
    # records that link but stop short of the snapshot's version: the chain keeps them (a site far
    # behind catches up over several snapshots), the model does not move
    refused([_resign(b, agg_key, audit=(rec2,)) for b in s3], "audit-gap", "reach version 2 only")
    assert (agent.guard.chains[0].head, state.version) == (2, 1)

    send(deltas[2])
    site.wait(lambda: state.version == 2, "version 2 applied")
    send(deltas[3])
    site.wait(lambda: state.version == 3, "version 3 applied")
    refused(snaps[1], "rollback", "global version 1 (snapshot) is older than the version 3 held (rollback)")
    assert agent.guard.chains[0].head == 3

    # what the site kept verifies offline, and proves which version folded which update
    agent.stop()
    site.thread.join(30)
    pub = str(public_key_path(fed.keys_dir, AGGREGATOR_KEY_NAME))
    assert main(["audit", "verify", "--state-dir", str(agent.settings.state_dir), "--aggregator-key", pub]) == 0
    assert main(["audit", "prove", "--state-dir", str(agent.settings.state_dir), "--aggregator-key", pub,
                 "--update-id", f"{SITE}:2"]) == 0
