"""Aggregator settings: ``FEDMQ_*`` env vars, a TOML file, or CLI flags (see fedmq.shared.settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fedmq.shared.settings import FedmqSettings


class AggregatorSettings(FedmqSettings):
    #: public (evaluation-only) CKKS context; loading refuses a file holding a secret key
    public_context: Path = Path("keys/aggregator-public.ckks")
    #: directory of pinned ``<site>.hybrid.pub`` files: the list of known sites
    site_keys_dir: Path = Path("keys/sites")
    #: the aggregator's own hybrid signing key (``fedmq keys aggregator``): it signs every
    #: version, snapshot and audit record; sites pin ``aggregator.hybrid.pub``
    signing_key: Path = Path("keys/aggregator.hybrid")
    #: checkpoint, write-ahead log and status.json live here
    state_dir: Path = Path("state/aggregator")
    #: async: FedBuff, commit every buffer_size updates; sync: FedAvg rounds, one update per pinned site
    mode: Literal["async", "sync"] = "async"
    #: K: updates folded per version (async). Sync mode uses the number of pinned sites.
    buffer_size: int = Field(3, ge=1, le=10_000)
    #: a in s(tau) = (1 + tau)^-a
    staleness_exponent: float = Field(0.5, ge=0.0, le=10.0)
    #: refuse updates whose base version is more than this many versions old
    max_staleness: int = Field(16, ge=0)
    #: server learning rate: x_{v+1} = x_v + server_lr * weighted mean of the folded updates
    server_lr: float = Field(1.0, gt=0)
    #: Q: integer weight quantum; weight units m = max(1, round(Q * s(tau) * w / w_ref))
    weight_quantum: int = Field(64, ge=1, le=1 << 16)
    #: w_ref. Unset (recommended): the mean of the sample weights the sites report, so the
    #: server step is a weighted mean of updates and never scales with the image count. A number
    #: pins it (experiments): the step then scales with sample_weight / w_ref.
    reference_sample_weight: float | None = Field(None, gt=0)
    #: publish a full snapshot every M versions (0 = only on start-up and on request)
    snapshot_every: int = Field(10, ge=0)
    #: prometheus port; 0 = off
    metrics_port: int = Field(0, ge=0, le=65535)
    #: address the metrics endpoint listens on
    metrics_host: str = "0.0.0.0"
    #: an update whose chunks stop coming is dropped (and its site told) after this long
    incomplete_timeout_s: float = Field(120.0, gt=0)
    #: require AMQP ``user_id`` == chunk.site_id (sites connect as broker user = site id)
    check_user_id: bool = True
    #: expected layout fingerprint; None = the first accepted update fixes it
    layout_fingerprint: str | None = None
    #: this aggregator's shard (docs/sharding.md)
    shard_index: int = Field(0, ge=0)
    #: number of aggregator shards; federation-wide
    shard_count: int = Field(1, ge=1)
    #: unacknowledged messages the broker may hand over at once
    prefetch: int = Field(16, ge=1, le=10_000)
    #: AMQP heartbeat; 0 = off
    heartbeat_s: int = Field(60, ge=0)
    #: how often status.json is rewritten and incomplete updates are expired
    housekeeping_s: float = Field(2.0, gt=0)
    #: incomplete-update limits (ChunkAssembler)
    max_pending_updates: int = Field(256, ge=1)
    #: bytes held by incomplete updates at most
    max_pending_bytes: int = Field(512 << 20, ge=1 << 20)
    #: per-site bounds on incomplete updates (aggregator.update_guard): one site cannot crowd
    #: out the others; a normal site has one update in flight, two after a crash mid-publish
    max_pending_updates_per_site: int = Field(4, ge=1)
    #: bytes one site's incomplete updates may hold at most (refused with reason pending-limit)
    max_pending_bytes_per_site: int = Field(256 << 20, ge=1 << 20)
    #: committed update ids remembered per version, for duplicate detection, this many versions back
    remember_versions: int = Field(64, ge=1)
    #: commit worker processes beside the engine's thread (D_v + buffer on other cores, see
    #: shared/ckks_pool.py); None: one per further core, at most 2 (two keep up with the
    #: engine's saves); 0: every commit in the engine's thread
    commit_workers: int | None = Field(None, ge=0, le=64)

    @model_validator(mode="after")
    def _shard(self) -> "AggregatorSettings":
        if self.shard_index >= self.shard_count:
            raise ValueError("shard_index must be < shard_count")
        return self
