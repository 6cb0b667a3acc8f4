"""Durable aggregator state without a broker: WAL framing, checkpoints, recovery after a
"crash" (the engine object dropped mid-run), validation reasons, and no secret key anywhere."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.aggregator import checkpoint as cpmod
from fedmq.aggregator.engine import AggregatorEngine
from fedmq.aggregator.wal import WriteAheadLog, encode_record, read_records
from integration.aggregator_helpers import PlainReplay, make_federation, random_delta
from fedmq.shared.ckks import decrypt_block, load_context, serialize
from fedmq.shared.ckks_wire import MAGIC as CIPHERTEXT_MAGIC
from fedmq.shared.codec import decode_global_version
from fedmq.shared.errors import ConfigError, CryptoError, SecretKeyPresentError


# ------------------------------------------------------------------ WAL


def test_wal_round_trip_and_torn_tail(tmp_path):
    path = tmp_path / "wal.log"
    wal = WriteAheadLog(path)
    for i in range(5):
        wal.append({"t": "chunk", "i": i, "body": bytes([i]) * 100})
    wal.close()
    good_size = path.stat().st_size
    recs, end, torn = read_records(path)
    assert [r["i"] for r in recs] == list(range(5)) and end == good_size and not torn
    # a torn write: half of a sixth record
    frame = encode_record({"t": "chunk", "i": 5, "body": b"x" * 100})
    with open(path, "ab") as fh:
        fh.write(frame[: len(frame) // 2])
    recs, end, torn = read_records(path)
    assert len(recs) == 5 and torn and end == good_size
    # reopening truncates the torn tail, and appends continue cleanly
    wal = WriteAheadLog(path)
    wal.append({"t": "chunk", "i": 6})
    wal.close()
    recs, _, torn = read_records(path)
    assert [r["i"] for r in recs] == [0, 1, 2, 3, 4, 6] and not torn


def test_wal_crc_mismatch_stops_reading(tmp_path):
    path = tmp_path / "wal.log"
    path.write_bytes(encode_record({"a": 1}) + encode_record({"a": 2}))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # corrupt the last payload byte
    path.write_bytes(bytes(data))
    recs, _, torn = read_records(path)
    assert recs == [{"a": 1}] and torn


# ------------------------------------------------------------------ checkpoint


def test_checkpoint_round_trip_and_config_refusal(tmp_path):
    cp = cpmod.Checkpoint(version=3, value_scale=0.01, config={"weight_quantum": 64, "buffer_size": 3},
                          blocks={0: b"abc", 5: b"def"}, site_seq={"a": 4}, recent=[(3, ["a:4"])],
                          sites={"a": {"auc": 0.9}}, wal_segment="wal-000003.log")
    cpmod.save(tmp_path, cp)
    back = cpmod.load(tmp_path)
    assert back == cp
    cpmod.check_config(cp.config, {"weight_quantum": 64, "buffer_size": 3, "layout_fingerprint": "x"})
    with pytest.raises(ConfigError, match="weight_quantum"):
        cpmod.check_config(cp.config, {"weight_quantum": 32, "buffer_size": 3})


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return make_federation(tmp_path_factory.mktemp("fed"))


def test_engine_refuses_changed_settings(fed, tmp_path):
    AggregatorEngine(fed.settings(tmp_path / "s", weight_quantum=64)).close()
    with pytest.raises(ConfigError, match="weight_quantum"):
        AggregatorEngine(fed.settings(tmp_path / "s", weight_quantum=16))
    with pytest.raises(ConfigError, match="buffer_size"):
        AggregatorEngine(fed.settings(tmp_path / "s", buffer_size=5))


# ------------------------------------------------------------------ no secret key at the aggregator


def test_aggregator_context_cannot_decrypt_and_state_has_no_secret(fed, tmp_path):
    with pytest.raises(SecretKeyPresentError):
        load_context(fed.keys_dir / "site-secret.ckks", require_secret=False)
    eng = AggregatorEngine(fed.settings(tmp_path / "s", buffer_size=1))
    assert not eng.ctx.is_private
    bodies, _ = fed.update("alpha", 1, 0, random_delta(np.random.default_rng(0), fed.n_params))
    for b in bodies:
        eng.handle_chunk(b)
    assert eng.version == 1
    with pytest.raises(CryptoError, match="secret"):
        decrypt_block(eng.ctx, eng.D[0])
    secret_bytes = (fed.keys_dir / "site-secret.ckks").read_bytes()
    sk_probe = secret_bytes[-4096:]  # the tail of the serialized secret key
    for f in (tmp_path / "s").iterdir():
        data = f.read_bytes()
        assert sk_probe not in data, f"{f.name} holds secret key bytes"
        assert b"FEDMQCKKS1" not in data
    cp = cpmod.load(tmp_path / "s")
    for blob in cp.blocks.values():
        assert blob[:2] == CIPHERTEXT_MAGIC  # ciphertexts, not a key
    eng.close()


# ------------------------------------------------------------------ recovery


def _updates(fed, n_per_site=2, seed=3):
    rng = np.random.default_rng(seed)
    out = []
    for seq in range(1, n_per_site + 1):
        for site in fed.sites:
            bodies, sent = fed.update(site, seq, 0, random_delta(rng, fed.n_params), max_message_bytes=40_000)
            out.append((bodies, sent))
    return out


def _final_model(fed, eng):
    return fed.model({i: serialize(v) for i, v in eng.D.items()}, eng.value_scale)


def test_recovery_matches_uninterrupted_run(fed, tmp_path, monkeypatch):
    updates = _updates(fed)
    chunks = [b for bodies, _ in updates for b in bodies]
    kw = dict(max_staleness=100, staleness_exponent=0.0)

    ref = AggregatorEngine(fed.settings(tmp_path / "ref", **kw))
    for b in chunks:
        assert ref.handle_chunk(b)[0].action == "accept"
    assert ref.version == 2
    expected = _final_model(fed, ref)
    plain = PlainReplay()
    for _, sent in updates:
        plain.fold(sent, 64)
    np.testing.assert_allclose(expected, plain.model(fed.n_params, ref.value_scale), atol=1e-6)

    state = tmp_path / "crashy"
    # 1) crash in the middle of an update's chunks (object dropped, no close)
    eng = AggregatorEngine(fed.settings(state, **kw))
    for b in chunks[:5]:
        eng.handle_chunk(b)
    del eng
    # 2) crash while committing version 1: the checkpoint write "dies"
    eng = AggregatorEngine(fed.settings(state, **kw))
    assert eng.version == 0 and len(eng.buffer_ids) == 1 and len(eng.pending) == 1
    real_save = cpmod.save
    calls = {"n": 0}

    def dying_save(*a, **k):
        calls["n"] += 1
        raise OSError("simulated crash during checkpoint")

    monkeypatch.setattr(cpmod, "save", dying_save)
    i = 5
    with pytest.raises(OSError):
        while True:
            eng.handle_chunk(chunks[i])
            i += 1
    i += 1  # the chunk whose fold triggered the commit is in the WAL
    monkeypatch.setattr(cpmod, "save", real_save)
    del eng
    # 3) torn write at the end of the WAL
    eng = AggregatorEngine(fed.settings(state, **kw))
    assert eng.version == 1, "replay must finish the interrupted commit"
    seg = state / eng.segment
    eng.close()
    with open(seg, "ab") as fh:
        fh.write(b"FW\x00\x00\x10\x00garbage")
    eng = AggregatorEngine(fed.settings(state, **kw))
    # redelivery of everything already seen is dropped, not folded twice
    for b in chunks[:i]:
        d, _ = eng.handle_chunk(b, redelivered=True)
        assert d.action == "drop", d
    for b in chunks[i:]:
        assert eng.handle_chunk(b)[0].action == "accept"
    assert eng.version == 2 and eng.duplicates_dropped == i
    np.testing.assert_allclose(_final_model(fed, eng), expected, atol=1e-6)
    # and a restart at rest publishes a snapshot equal to the same model
    eng.close()
    eng = AggregatorEngine(fed.settings(state, **kw))
    snap = [decode_global_version(o.body, max_bytes=1 << 30) for o in eng.drain_startup() if o.kind == "snapshot"]
    blocks = {b.index: b.ciphertext for c in snap for b in c.blocks}
    assert snap and snap[0].version == 2
    np.testing.assert_allclose(fed.model(blocks, snap[0].value_scale), expected, atol=1e-6)


# ------------------------------------------------------------------ validation reasons (no broker)


def test_engine_validation_reasons(fed, tmp_path):
    eng = AggregatorEngine(fed.settings(tmp_path / "v", buffer_size=1, max_staleness=0, check_user_id=True))
    rng = np.random.default_rng(5)
    d = random_delta(rng, fed.n_params)
    bodies, _ = fed.update("alpha", 1, 0, d)
    assert eng.accept(bodies[0], user_id="bravo").reason == "identity"
    assert eng.accept(b"\x93\x01", user_id="alpha").reason in {"malformed", "truncated"}
    assert eng.accept(bodies[0], user_id="alpha").action == "accept"
    assert eng.accept(bodies[0], user_id="alpha").reason == "duplicate"
    future, _ = fed.update("alpha", 2, 9, d)
    assert eng.accept(future[0], user_id="alpha").reason == "future-version"
    other_layout, _ = fed.update("bravo", 1, 0, d, layout_fp="another-layout-000000")
    assert eng.accept(other_layout[0], user_id="bravo").reason == "layout-fingerprint"
    assert eng.accept(bodies[0][:-3], user_id="alpha").reason in {"truncated", "malformed"}
    with pytest.raises(CryptoError):
        AggregatorEngine(fed.settings(tmp_path / "w"), context=fed.secret)
    eng.close()


def test_status_json_and_cli(fed, tmp_path, capsys):
    from fedmq.shared.cli import main

    eng = AggregatorEngine(fed.settings(tmp_path / "st", buffer_size=2))
    bodies, _ = fed.update("alpha", 1, 0, random_delta(np.random.default_rng(9), fed.n_params))
    for b in bodies:
        eng.handle_chunk(b)
    eng.accept(b"junk")
    eng.write_status()
    assert main(["status", "--state-dir", str(tmp_path / "st")]) == 0
    out = capsys.readouterr().out
    assert "version 0" in out and "buffer 1/2" in out and "alpha:1" in out and "malformed=1" in out
    assert main(["aggregator", "inspect", "--state-dir", str(tmp_path / "st")]) == 0
    eng.close()


# ------------------------------------------------------------------ snapshots at the smallest message size


def test_a_snapshot_for_a_site_far_behind_fits_the_smallest_message_limit(fed, tmp_path):
    """Found by ``make faults``: at max_message_bytes = 64 KiB a site 20 versions behind asked for
    a snapshot; its audit records took a quarter of the limit, a folded block (50 kB, no longer
    seeded) did not fit beside them, and the aggregator exited on the request, was restarted,
    got the redelivered request and exited again. The records now take what the largest block
    leaves, so the answer fits; the site asks again for the records that did not."""
    from fedmq.shared.codec import encode_snapshot_request
    from fedmq.shared.schema import SnapshotRequest

    limit = 64 * 1024
    eng = AggregatorEngine(fed.settings(tmp_path / "s", buffer_size=1, max_message_bytes=limit))
    rng = np.random.default_rng(11)
    for seq in range(1, 23):
        for body in fed.update("alpha", seq, eng.version, random_delta(rng, fed.n_params), max_message_bytes=limit)[0]:
            assert eng.handle_chunk(body)[0].action == "accept"
    assert eng.version == 22
    request = encode_snapshot_request(SnapshotRequest(site_id="bravo", have_version=1, reason="gap"))
    decision, out = eng.handle_snapshot_request(request, user_id="bravo")
    assert decision.action == "accept" and out
    chunks = [decode_global_version(o.body, max_bytes=limit) for o in out]  # each under the limit
    assert all(len(o.body) <= limit for o in out)
    assert {b.index for c in chunks for b in c.blocks} == set(range(fed.total_blocks))
    audit = [r for c in chunks for r in c.audit]
    assert 1 <= len(audit) < 21  # the oldest records after version 1, as many as fit
    # a limit below one block plus one record (no setting allows it; forced here) is refused with
    # its reason, never raised: the request would come back and stop the aggregator again
    eng.settings = eng.settings.model_copy(update={"max_message_bytes": 52_000})
    decision, out = eng.handle_snapshot_request(request, user_id="bravo")
    assert decision.action == "reject" and decision.reason == "oversize" and out == []
    eng.close()
