"""RabbitMQ definitions (users, vhost, permissions, exchanges, queues, bindings) for fedmq.

The same users and permissions as :mod:`broker.provision`, as one JSON document a broker loads
at boot (``load_definitions = /etc/rabbitmq/definitions.json`` in ``rabbitmq.conf``) or
imports with ``rabbitmqctl import_definitions FILE``. Passwords are stored the way RabbitMQ
stores them (``rabbit_password_hashing_sha256``: base64 of a 4-byte salt followed by
SHA-256(salt + UTF-8 password)); since fedmq's passwords are 192-bit random tokens, a single
salted SHA-256 is not a weakness here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmq.broker import topology
from fedmq.broker.provision import UserGrant, all_queue_specs

PASSWORD_HASHING = "rabbit_password_hashing_sha256"


def rabbit_password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt4 + sha256(salt4 + utf8(pw)))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("RabbitMQ password salts are 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode("utf-8")).digest()).decode("ascii")


def check_password_hash(password: str, password_hash: str) -> bool:
    raw = base64.b64decode(password_hash)
    return secrets.compare_digest(rabbit_password_hash(password, raw[:4]), password_hash)


def definitions(
    vhost: str,
    grants: Sequence[UserGrant],
    *,
    sites: Sequence[str] = (),
    shards: int = 1,
    policies: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A RabbitMQ definitions document (``rabbitmqctl import_definitions`` / ``load_definitions``)."""
    queues = all_queue_specs(sites, shards)
    return {
        "users": [
            {"name": g.user, "password_hash": rabbit_password_hash(g.password), "hashing_algorithm": PASSWORD_HASHING, "tags": list(g.tags)}
            for g in grants
        ],
        "vhosts": [{"name": vhost}],
        "permissions": [
            {"user": g.user, "vhost": vhost, "configure": g.permissions.configure, "write": g.permissions.write, "read": g.permissions.read}
            for g in grants
        ],
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": [{"vhost": vhost, **p} for p in policies],
        "exchanges": [
            {"name": e.name, "vhost": vhost, "type": e.type, "durable": True, "auto_delete": False, "internal": False, "arguments": {}}
            for e in topology.EXCHANGES
        ],
        "queues": [{"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": dict(q.arguments)} for q in queues],
        "bindings": [
            {"source": ex, "vhost": vhost, "destination": q.name, "destination_type": "queue", "routing_key": key, "arguments": {}}
            for q in queues
            for ex, key in q.bindings
        ],
    }


def write_definitions(path: str | os.PathLike[str], document: dict[str, Any], mode: int = 0o644) -> Path:
    """Write the JSON (mode 0644 by default: the broker's own user must read it; hashes only)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    os.chmod(tmp, mode)
    os.replace(tmp, out)
    return out


__all__ = ["PASSWORD_HASHING", "check_password_hash", "definitions", "rabbit_password_hash", "write_definitions"]
