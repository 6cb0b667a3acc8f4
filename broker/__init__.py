"""RabbitMQ side of fedmq: topology names, provisioning, TLS, the transport seam
(``broker.transport``: the only code that imports pika, with the one reconnect loop) and the
private-node launcher behind ``fedmq broker local``. The test suite's broker harness and
cluster live in ``tests/testkit/`` and are not installed.

Submodules are imported explicitly (``from broker.transport import run_reconnecting``) so that
importing the package starts nothing and reads no environment.
"""
