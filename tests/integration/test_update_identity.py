"""Update ids bound to identity, and incomplete updates bounded (issue 15), on the real broker.

- the squat: hospital_1, with its own key, publishes update_id ``hospital_2:1``; it is refused
  (``identity``) and hospital_2's real ``hospital_2:1`` is then folded;
- the stall: an update whose chunks stop coming expires, its memory is released, and the
  same update sent again in full is folded (the id is not blocked);
- the bounds: one site cannot hold more incomplete updates than its share.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from integration.aggregator_helpers import (
    AggregatorThread, GlobalListener, connect, declare_topology, drain_dead_letters, make_federation, publish,
    random_delta,
)
from fedmq.shared.codec import decode_rejection, decode_update_chunk, encode_update_chunk
from fedmq.shared.signing import sign_chunk

pytestmark = pytest.mark.broker

SITES = ("hospital_1", "hospital_2")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return make_federation(tmp_path_factory.mktemp("fed"), sites=SITES)


def _purge_dead_letters(url: str) -> None:
    from fedmq.broker.topology import DEAD_LETTER_QUEUE

    conn = connect(url)
    try:
        conn.channel().queue_purge(DEAD_LETTER_QUEUE)
    finally:
        conn.close()


def _update(fed, site: str, seq: int, rng: np.random.Generator, **kw) -> list[bytes]:  # noqa: ANN001
    return fed.update(site, seq, 0, random_delta(rng, fed.n_params), **kw)[0]


def test_squatting_another_sites_update_id_is_refused(fed, amqp_url, tmp_path) -> None:  # noqa: ANN001
    rng = np.random.default_rng(1)
    declare_topology(amqp_url)
    settings = fed.settings(tmp_path / "state", amqp_url=amqp_url, buffer_size=1)
    # hospital_1 signs, with its own key, chunks that claim hospital_2's next (predictable) id
    squat = []
    for body in _update(fed, "hospital_1", 1, rng):
        chunk = decode_update_chunk(body, max_bytes=len(body) + 1).model_copy(update={"update_id": "hospital_2:1"})
        squat.append(encode_update_chunk(sign_chunk(chunk, fed.signing["hospital_1"])))
    listener = GlobalListener(amqp_url)
    try:
        with AggregatorThread(settings) as agg:
            publish(amqp_url, squat)
            dead = drain_dead_letters(amqp_url, len(squat))
            assert [h["x-fedmq-reason"] for h, _ in dead] == ["identity"] * len(squat), [h for h, _ in dead]
            assert agg.engine.version == 0 and not agg.engine.pending
            publish(amqp_url, _update(fed, "hospital_2", 1, rng))
            v1 = listener.wait_for(lambda v: v["version"] == 1 and v["mode"] == "delta")
            assert [(c.site_id, c.update_id) for c in v1["contributors"]] == [("hospital_2", "hospital_2:1")]
            assert agg.engine.metrics.reason_counts.get("duplicate", 0) == 0
    finally:
        listener.close()


def test_a_stalled_update_expires_and_can_be_sent_again(fed, amqp_url, tmp_path) -> None:  # noqa: ANN001
    rng = np.random.default_rng(2)
    declare_topology(amqp_url)
    settings = fed.settings(tmp_path / "state", amqp_url=amqp_url, buffer_size=1, incomplete_timeout_s=1.0)
    bodies = _update(fed, "hospital_2", 1, rng, max_message_bytes=100_000)
    assert len(bodies) > 1
    listener = GlobalListener(amqp_url)
    try:
        with AggregatorThread(settings) as agg:
            publish(amqp_url, bodies[:1])  # the site dies after its first chunk
            dead = drain_dead_letters(amqp_url, 1, timeout=30)
            assert dead and dead[0][0]["x-fedmq-reason"] == "incomplete"
            assert decode_rejection(dead[0][1]).update_id == "hospital_2:1"
            # expired: nothing of it is held any more
            assert not agg.engine.pending and len(agg.engine.assembler) == 0
            # the site comes back and re-sends the same persisted update: it folds, once
            publish(amqp_url, bodies)
            v1 = listener.wait_for(lambda v: v["version"] == 1 and v["mode"] == "delta")
            assert [c.update_id for c in v1["contributors"]] == ["hospital_2:1"]
            _purge_dead_letters(amqp_url)
            publish(amqp_url, bodies)  # and a third copy is a duplicate, folded never
            assert {h["x-fedmq-reason"] for h, _ in drain_dead_letters(amqp_url, len(bodies))} == {"duplicate"}
            assert agg.engine.version == 1
    finally:
        listener.close()


def test_one_site_cannot_hold_more_incomplete_updates_than_its_share(fed, amqp_url, tmp_path) -> None:  # noqa: ANN001
    rng = np.random.default_rng(3)
    declare_topology(amqp_url)
    settings = fed.settings(tmp_path / "state", amqp_url=amqp_url, max_pending_updates_per_site=1)
    first = {(s, q): _update(fed, s, q, rng, max_message_bytes=100_000)[:1] for s, q in
             (("hospital_1", 1), ("hospital_1", 2), ("hospital_2", 1))}
    with AggregatorThread(settings) as agg:
        publish(amqp_url, first[("hospital_1", 1)] + first[("hospital_1", 2)])
        dead = drain_dead_letters(amqp_url, 1)
        assert dead and dead[0][0]["x-fedmq-reason"] == "pending-limit", dead[0][0] if dead else None
        publish(amqp_url, first[("hospital_2", 1)])  # another site still gets its share
        deadline = time.monotonic() + 30
        while "hospital_2:1" not in agg.engine.pending and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(agg.engine.pending) == ["hospital_1:1", "hospital_2:1"]
