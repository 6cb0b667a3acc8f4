"""RabbitMQ side of fedmq: topology, provisioning, and the local-node test harness.

Submodules are imported explicitly (``from broker.harness import open_test_broker``) so that
importing the package starts nothing and reads no environment.
"""
