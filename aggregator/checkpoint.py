"""Checkpoint: the committed state D_v and bookkeeping, written atomically at each commit.

Plain msgpack so any tool can read it::

    {schema_version, version, value_scale, config: {...immutable settings...},
     blocks: [[index, ciphertext bytes], ...], site_seq: {site: last seq},
     recent: [[version, [update ids]], ...], sites: {site: {...status info...}},
     wal_segment: "wal-000007.log", created_at}

Ciphertexts only: the aggregator never holds a secret key, so none can be written here.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from fedmq.shared.atomic import atomic_write_stream
from fedmq.shared.errors import ConfigError

CHECKPOINT_SCHEMA_VERSION = 1
CHECKPOINT_FILE = "checkpoint.msgpack"

#: settings that fix the meaning of D; a restart with any of them changed is refused
IMMUTABLE_KEYS = (
    "mode", "weight_quantum", "buffer_size", "server_lr", "value_scale", "key_fingerprint",
    "layout_fingerprint", "total_blocks", "block_size", "shard_index", "shard_count",
)


@dataclass
class Checkpoint:
    version: int
    value_scale: float
    config: dict[str, Any]
    blocks: dict[int, bytes] = field(default_factory=dict)
    site_seq: dict[str, int] = field(default_factory=dict)
    recent: list[tuple[int, list[str]]] = field(default_factory=list)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    wal_segment: str = ""
    created_at: float = field(default_factory=time.time)

    def _fields(self) -> dict[str, Any]:
        return {
            "schema_version": CHECKPOINT_SCHEMA_VERSION,
            "version": self.version,
            "value_scale": self.value_scale,
            "config": self.config,
            "blocks": None,  # written block by block (see write_to)
            "site_seq": self.site_seq,
            "recent": [[v, list(ids)] for v, ids in self.recent],
            "sites": self.sites,
            "wal_segment": self.wal_segment,
            "created_at": self.created_at,
        }

    def write_to(self, out: BinaryIO) -> None:
        """The same msgpack map as ``to_bytes``, streamed: the blocks are never copied into one
        buffer (a ResNet-50-size D is ~290 MB)."""
        packer = msgpack.Packer(use_bin_type=True)
        fields = self._fields()
        out.write(packer.pack_map_header(len(fields)))
        for key, value in fields.items():
            out.write(packer.pack(key))
            if key != "blocks":
                out.write(packer.pack(value))
                continue
            out.write(packer.pack_array_header(len(self.blocks)))
            for i in sorted(self.blocks):
                out.write(packer.pack([i, self.blocks[i]]))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.write_to(buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Checkpoint":
        return cls.from_obj(msgpack.unpackb(data, raw=False, strict_map_key=False))

    @classmethod
    def from_obj(cls, obj: Any) -> "Checkpoint":
        if not isinstance(obj, dict):
            raise ConfigError("checkpoint is not a msgpack map")
        if obj.get("schema_version") != CHECKPOINT_SCHEMA_VERSION:
            raise ConfigError(f"checkpoint schema_version {obj.get('schema_version')!r} is not {CHECKPOINT_SCHEMA_VERSION}")
        return cls(
            version=int(obj["version"]),
            value_scale=float(obj["value_scale"]),
            config=dict(obj["config"]),
            blocks={int(i): bytes(b) for i, b in obj["blocks"]},
            site_seq={str(k): int(v) for k, v in obj["site_seq"].items()},
            recent=[(int(v), list(ids)) for v, ids in obj["recent"]],
            sites=dict(obj.get("sites", {})),
            wal_segment=str(obj["wal_segment"]),
            created_at=float(obj["created_at"]),
        )


def save(state_dir: str | Path, cp: Checkpoint) -> Path:
    """Atomically (temp file, fsync, rename, fsync the directory), streamed."""
    return atomic_write_stream(Path(state_dir) / CHECKPOINT_FILE, cp.write_to)


def load(state_dir: str | Path) -> Checkpoint | None:
    path = Path(state_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    with open(path, "rb") as fh:  # streamed: the file is not read into one buffer first
        unpacker = msgpack.Unpacker(fh, raw=False, strict_map_key=False, max_buffer_size=1 << 30)
        try:
            obj = unpacker.unpack()
        except (msgpack.OutOfData, ValueError) as exc:
            raise ConfigError(f"{path}: unreadable checkpoint ({exc})") from None
    return Checkpoint.from_obj(obj)


def check_config(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to start when a setting that fixes the meaning of D changed.

    A key that is None on either side (e.g. a layout not seen yet) is not compared.
    """
    changed = []
    for key in IMMUTABLE_KEYS:
        a, b = saved.get(key), current.get(key)
        if a is None or b is None:
            continue
        if a != b:
            changed.append(f"{key}: checkpoint has {a!r}, settings say {b!r}")
    if changed:
        raise ConfigError(
            "the aggregator state was built with different settings; refusing to start "
            "(use a new state directory to start a new federation):\n  " + "\n  ".join(changed)
        )
