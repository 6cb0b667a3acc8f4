"""The engine's parts on their own: WAL framing done ahead, the typed site status, the policy's
round and membership rules."""

from __future__ import annotations

import pytest

from fedmq.aggregator.policy import DuplicateRound, Policy, answer_snapshot_request
from fedmq.aggregator.site_status import SiteStatus
from fedmq.aggregator.wal import encode_record, frame_body, frame_parts, read_records
from fedmq.shared.errors import ConfigError


@pytest.mark.parametrize("size", [0, 255, 256, 65_535, 65_536, 300_000])
def test_a_body_framed_ahead_gives_the_same_wal_bytes(size, tmp_path):
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    record = {"body": body, "t": "chunk", "uid": "a:1", "ci": 0, "st": 2, "u": 64, "user": None,
              "redelivered": False, "at": 1.5, "dg": b"d" * 64}
    parts = frame_parts(record, frame_body(body, len(record)))
    assert b"".join(parts) == encode_record(record)
    (tmp_path / "w.log").write_bytes(b"".join(parts))
    assert read_records(tmp_path / "w.log") == ([record], len(b"".join(parts)), False)


def test_framing_refuses_a_record_it_was_not_made_for():
    body = b"x" * 10
    framed = frame_body(body, 2)
    with pytest.raises(ValueError):
        frame_parts({"body": body, "t": "chunk", "uid": "a"}, framed)  # another number of fields
    with pytest.raises(ValueError):
        frame_parts({"t": "chunk", "body": body}, framed)  # body not first


def test_site_status_keeps_its_plain_form():
    st = SiteStatus()
    assert st.to_dict() == {}
    st.note_refused("too-stale")
    st.note_refused("too-stale")
    st.note_first_chunk(120.0, "h1", seq=3)
    st.note_folded("a:3", staleness=1, weight_units=32, base_version=4)
    st.note_sequence_backwards(1, 3)
    st.note_sequence_backwards(1, 3)
    plain = st.to_dict()
    assert plain["rejected"] == {"too-stale": 2} and plain["updates_folded"] == 1
    assert plain["sequence_backwards"]["count"] == 2 and plain["sequence_backwards"]["last_seq"] == 3
    assert SiteStatus.from_dict(plain) == st
    st.note_first_chunk(120.0, "h2", seq=3)  # not past the last accepted seq: the alarm stays
    assert st.sequence_backwards is not None
    st.note_first_chunk(120.0, "h3", seq=4)  # continues past it: the alarm is over
    assert st.sequence_backwards is None and st.last_header == "h3"


def _sync() -> Policy:
    return Policy(mode="sync", buffer_size=3, staleness_exponent=0.5, max_staleness=4, weight_quantum=64,
                  reference_sample_weight=1.0, sites=frozenset({"a", "b"}))


def test_the_sync_round_is_the_policys():
    p = _sync()
    p.note_admitted("a")
    with pytest.raises(DuplicateRound):
        p.admit(site_id="a", base_version=0, current_version=0, sample_weight=1.0)
    assert not p.commit_due(1)
    p.note_abandoned("a")  # its update expired: it may contribute again
    p.admit(site_id="a", base_version=0, current_version=0, sample_weight=1.0)
    p.note_admitted("a")
    p.note_admitted("b")
    assert p.commit_due(2)
    p.start_round({"b"})  # b's next update is still incomplete at the commit
    assert p.round_sites == {"b"}
    with pytest.raises(ConfigError):
        Policy(mode="sync", buffer_size=3, staleness_exponent=0.5, max_staleness=4, weight_quantum=64).check_members()


def test_snapshot_requests_are_answered_by_the_membership_rule():
    assert answer_snapshot_request(have_version=-1, accepted_seq=3, shard_index=0, own_shard=0) == "known-identity"
    assert answer_snapshot_request(have_version=-1, accepted_seq=0, shard_index=0, own_shard=0) == "send"
    assert answer_snapshot_request(have_version=2, accepted_seq=3, shard_index=1, own_shard=0) == "other-shard"
