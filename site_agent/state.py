"""What a site must not forget across restarts: its view of the global model and its queue.

Files in ``state_dir`` (each written atomically; ``state.json`` last, naming the others by
generation so a crash between writes leaves the previous consistent set in force):
- ``state.json``: schema version, site id, version held, next sequence number, updates sent,
  the fingerprints it was made with, and the generation of the array files;
- ``global-<gen>.npy``: the decrypted sum D_v (x_v = x_0 + value_scale * D_v);
- ``residual-<gen>.npy``: the error-feedback residual of block top-k;
- ``pending-<gen>.msgpack``: an encrypted update built but not yet confirmed by the broker,
  re-published with the same update id after a crash.
The privacy ledger lives beside them in its own file (``site_agent.training.ledger``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from fedmq.shared.atomic import atomic_write_bytes, atomic_write_json
from fedmq.shared.errors import ConfigError

STATE_SCHEMA_VERSION = 1


@dataclass
class SiteState:
    site_id: str
    key_fingerprint: str
    layout_fingerprint: str
    value_scale: float = 0.0
    version: int = 0
    next_seq: int = 1
    updates_sent: int = 0
    bytes_sent: int = 0
    last_trained_base: int = -1
    generation: int = 0
    global_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    residual: np.ndarray | None = None
    pending: list[bytes] | None = None  # encoded, signed UpdateChunk messages
    pending_seq: int | None = None
    #: with a sharded aggregator (docs/sharding.md): the version held of each shard; ``version``
    #: is then their sum. None with one shard (``version`` is the version).
    shard_versions: list[int] | None = None


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class SiteStateStore:
    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "state.json"

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, state: SiteState) -> None:
        state.generation += 1
        g = state.generation
        atomic_write_bytes(self.dir / f"global-{g}.npy", _npy_bytes(state.global_sum))
        if state.residual is not None:
            atomic_write_bytes(self.dir / f"residual-{g}.npy", _npy_bytes(state.residual))
        if state.pending is not None:
            atomic_write_bytes(self.dir / f"pending-{g}.msgpack", msgpack.packb(state.pending, use_bin_type=True))
        atomic_write_json(
            self.path,
            {
                "schema_version": STATE_SCHEMA_VERSION,
                "site_id": state.site_id,
                "key_fingerprint": state.key_fingerprint,
                "layout_fingerprint": state.layout_fingerprint,
                "value_scale": state.value_scale,
                "version": state.version,
                "next_seq": state.next_seq,
                "updates_sent": state.updates_sent,
                "bytes_sent": state.bytes_sent,
                "last_trained_base": state.last_trained_base,
                "generation": g,
                "has_residual": state.residual is not None,
                "pending_seq": state.pending_seq if state.pending is not None else None,
                **({"shard_versions": list(state.shard_versions)} if state.shard_versions is not None else {}),
            },
        )
        for old in self.dir.glob("*-*.npy"):
            self._drop_if_old(old, g)
        for old in self.dir.glob("pending-*.msgpack"):
            self._drop_if_old(old, g)

    @staticmethod
    def _drop_if_old(path: Path, generation: int) -> None:
        try:
            if int(path.stem.rsplit("-", 1)[1]) < generation:
                path.unlink(missing_ok=True)
        except ValueError:
            pass

    def load(self, site_id: str, key_fingerprint: str, layout_fingerprint: str) -> SiteState:
        try:
            meta = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"site state {self.path} unreadable: {exc}") from None
        if meta.get("schema_version") != STATE_SCHEMA_VERSION:
            raise ConfigError(f"site state {self.path} has schema {meta.get('schema_version')}, expected {STATE_SCHEMA_VERSION}")
        for key, expected in (("site_id", site_id), ("key_fingerprint", key_fingerprint), ("layout_fingerprint", layout_fingerprint)):
            if meta[key] != expected:
                raise ConfigError(f"site state {self.path} belongs to {key}={meta[key]!r}, not {expected!r}; use a fresh state dir")
        g = meta["generation"]
        residual = np.load(self.dir / f"residual-{g}.npy") if meta["has_residual"] else None
        pending = None
        if meta["pending_seq"] is not None:
            pending = list(msgpack.unpackb((self.dir / f"pending-{g}.msgpack").read_bytes(), raw=False))
        return SiteState(
            site_id=site_id,
            key_fingerprint=key_fingerprint,
            layout_fingerprint=layout_fingerprint,
            value_scale=meta["value_scale"],
            version=meta["version"],
            next_seq=meta["next_seq"],
            updates_sent=meta["updates_sent"],
            bytes_sent=meta.get("bytes_sent", 0),
            last_trained_base=meta["last_trained_base"],
            generation=g,
            global_sum=np.load(self.dir / f"global-{g}.npy"),
            residual=residual,
            pending=pending,
            pending_seq=meta["pending_seq"],
            shard_versions=list(meta["shard_versions"]) if meta.get("shard_versions") is not None else None,
        )
