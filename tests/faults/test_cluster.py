"""A three-node RabbitMQ cluster (private nodes, quorum queues with 3 replicas): the node the
aggregator and the publishing site are connected to is stopped in the middle of a run; both
fail over to the other nodes (comma-separated multi-node URL), nothing is lost and every
confirmed update is folded exactly once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pika
import pytest

from fedmq.aggregator.consumer import AggregatorService
from fedmq.broker import topology
from fedmq.broker.connection import connect
from fedmq.experiments.faults.fuzz import FuzzKit

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.slow]


def _publish(url: str, bodies: list[bytes], attempts: int = 20) -> None:
    """Publish each body with confirms, as a site does: what the broker did not confirm (a nack
    while the quorum queue elects a new leader after a node stopped, or a connection lost) is
    sent again on a new connection. A re-sent chunk that had been enqueued after all is refused
    by the aggregator as a duplicate, so exactly-once is still what the test checks."""
    pending = list(bodies)
    for attempt in range(attempts):
        try:
            conn = connect(url, attempts=10)
            try:
                ch = conn.channel()
                ch.confirm_delivery()
                while pending:
                    ch.basic_publish(topology.UPDATES_EXCHANGE, topology.shard_key(0), pending[0],
                                     pika.BasicProperties(delivery_mode=2), mandatory=True)
                    pending.pop(0)
                return
            finally:
                if conn.is_open:
                    conn.close()
        except (pika.exceptions.NackError, pika.exceptions.AMQPError):
            time.sleep(0.5)
    raise AssertionError(f"{len(pending)} update chunk(s) never confirmed after {attempts} attempts")


@pytest.fixture(scope="module")
def cluster():
    from testkit.cluster import LocalRabbitCluster
    from fedmq.broker.local_node import find_rabbitmq_install

    if find_rabbitmq_install() is None:
        pytest.skip("rabbitmq-server not installed")
    with LocalRabbitCluster(3) as c:
        yield c


@pytest.mark.timeout(300)
def test_node_loss_mid_run_loses_nothing(cluster, tmp_path: Path) -> None:
    assert len(cluster.running_nodes()) == 3
    cluster.add_vhost("fedmq")
    url = cluster.url("fedmq")
    conn = connect(url)
    topology.declare(conn.channel(), topology.EXCHANGES, topology.aggregator_queue_specs())
    conn.close()
    assert len(cluster.queue_members("fedmq", topology.updates_queue(0))) == 3, "quorum queue not replicated on 3 nodes"

    kit = FuzzKit.create(tmp_path / "kit")
    rng = np.random.default_rng(3)
    updates = [kit.update(seq, rng) for seq in range(1, 7)]
    settings = kit.settings(tmp_path / "state", amqp_url=url, buffer_size=2, reconnect_initial_s=0.2, reconnect_max_s=1.0,
                            heartbeat_s=5)
    svc = AggregatorService(settings)  # the product's own connect: the node list, in order
    th = threading.Thread(target=svc.run, daemon=True)
    th.start()
    try:
        assert svc.ready.wait(30)
        _publish(url, [b for bodies, _ in updates[:3] for b in bodies])  # confirmed by the cluster
        cluster.stop_node(0)  # the node everyone is connected to, with deliveries possibly in flight
        assert len(cluster.running_nodes()) == 2
        _publish(url, [b for bodies, _ in updates[3:] for b in bodies])  # fails over to node 2
        deadline = time.monotonic() + 90
        while svc.engine.version < 3 and time.monotonic() < deadline:
            assert th.is_alive(), "aggregator thread died"
            time.sleep(0.2)
        assert svc.engine.version == 3, f"stuck at version {svc.engine.version}"
        assert svc.connections >= 2, "the aggregator should have reconnected to another node"
        ids = [u for _, us in svc.engine.recent for u in us]
        assert sorted(ids) == [f"alpha:{q}" for q in range(1, 7)], ids
        expect: dict[int, np.ndarray] = {}
        for _, sent in updates:
            for i, v in sent.items():
                expect[i] = expect.get(i, 0.0) + v
        assert kit.decrypt_max_error(svc.engine.D.data, expect, 64) < 1e-3
    finally:
        svc.stop()
        th.join(30)
