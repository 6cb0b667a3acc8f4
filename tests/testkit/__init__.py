"""Test-only infrastructure (not installed with fedmq): the session broker for the suite
(``testkit.broker``: a private RabbitMQ node, a testcontainers container, or an external URL)
and a private multi-node cluster (``testkit.cluster``). Both build on the product's private-node
launcher, ``broker.local_node``, which ``fedmq broker local`` also uses."""
