"""The central aggregator: folds CKKS-encrypted, signed, sparsified updates without a secret key.

Layers (see docs/aggregation.md): ``fold`` (pure maths), ``policy`` (what to accept, when to
commit), ``wal`` + ``checkpoint`` (durable state), ``engine`` (state machine, no broker I/O),
``consumer`` + ``publisher`` (pika), ``metrics``, ``cli`` / ``status_cli``.
"""
