"""The test kit: keys, signed encrypted updates and the plaintext they carry, for a small
federation that runs no process and no broker.

One kit for everything that needs "a valid update and what it should decrypt to": the tests
(``tests/integration/aggregator_helpers.py`` builds its ``FederationKit`` on it), the fault
driver's fuzzing (``fedmq.experiments.faults.fuzz``) and the benchmarks (``benchmarks.harness``).
It is an explicit module of the product so that ``fedmq faults run`` and ``make bench`` can
use it from an installed fedmq; no service imports it. It lives in experiments/ rather than
shared/ because it builds updates with the site's builder and aggregator settings, and shared/
is the layer both of those import.

Everything goes through the real code: ``shared.ckks`` keys, ``site_agent.update_builder``
(sparsify, encrypt, chunk, sign) and ``shared.codec``; nothing here encrypts or signs by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.shared.ckks import LoadedContext, decrypt_block, init_keys, load_context
from fedmq.shared.signing import (
    AGGREGATOR_KEY_NAME, SigningKey, generate_aggregator_key, generate_site_key, load_private_key, private_key_path,
)

#: the layout fingerprint kit updates carry (no model behind them: random deltas)
LAYOUT_FP = "layout-test-0000000000000001"
#: aggregator settings every kit aggregator shares: no broker identity checks, no periodic
#: snapshots; callers add what their scenario needs (buffer size, message limit, ...)
BASE_SETTINGS: dict[str, Any] = dict(check_user_id=False, log_json=False, snapshot_every=0)


@dataclass
class KitUpdate:
    """One encoded update: its chunks as published, the plaintext blocks it carries (block index
    -> the padded delta's values; what a decryption of the fold must give back, times the
    weight), and the builder's result (sent indices, residual, timings)."""

    bodies: list[bytes]
    sent: dict[int, np.ndarray]
    built: Any


class UpdateKit:
    """Keys of one federation: the CKKS key pair, the aggregator's signing key and a signing key
    per site (made on first use), plus builders of signed, encrypted updates."""

    __test__ = False  # not a pytest test class, though tests import it

    def __init__(self, root: Path, secret: LoadedContext, public_path: Path, keys_dir: Path, site_keys_dir: Path,
                 layout_fp: str = LAYOUT_FP) -> None:
        self.root = root
        self.secret = secret
        self.public_path = public_path
        self.keys_dir = keys_dir
        self.site_keys_dir = site_keys_dir
        self.layout_fp = layout_fp
        self.signing: dict[str, SigningKey] = {}
        self._public: LoadedContext | None = None

    @classmethod
    def create(cls, root: Path, sites: tuple[str, ...] | list[str] = (), *, preset: str | None = None,
               layout_fp: str = LAYOUT_FP) -> UpdateKit:
        """New keys under ``root`` (``keys/`` and ``site-keys/``); ``preset`` is a CKKS preset
        name of ``shared.ckks.PRESETS`` (the default preset when None)."""
        files = init_keys(root / "keys", preset) if preset else init_keys(root / "keys")
        generate_aggregator_key(root / "keys")
        (root / "site-keys").mkdir(parents=True, exist_ok=True)
        kit = cls(root, load_context(files.secret_context, require_secret=True), files.public_context, root / "keys",
                  root / "site-keys", layout_fp)
        for site in sites:
            kit.site_key(site)
        return kit

    # -- keys -------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.secret.block_size

    @property
    def public(self) -> LoadedContext:
        """The aggregator's view of the key (no secret)."""
        if self._public is None:
            self._public = load_context(self.public_path, require_secret=False)
        return self._public

    @property
    def aggregator_key_path(self) -> Path:
        return private_key_path(self.keys_dir, AGGREGATOR_KEY_NAME)

    def site_key(self, site: str) -> SigningKey:
        """The site's signing key, generated (and its public half pinned in ``site_keys_dir``) on first use."""
        if site not in self.signing:
            if not private_key_path(self.site_keys_dir, site).exists():
                generate_site_key(self.site_keys_dir, site)
            self.signing[site] = load_private_key(private_key_path(self.site_keys_dir, site))
        return self.signing[site]

    def settings(self, state_dir: Path | str, **overrides: Any) -> Any:
        """``AggregatorSettings`` for an aggregator that trusts this kit's sites."""
        from fedmq.aggregator.settings import AggregatorSettings

        base: dict[str, Any] = dict(public_context=self.public_path, site_keys_dir=self.site_keys_dir,
                                    signing_key=self.aggregator_key_path, state_dir=Path(state_dir), **BASE_SETTINGS)
        base.update(overrides)
        return AggregatorSettings(**base)

    # -- updates ------------------------------------------------------------------------------
    def update(self, site: str, seq: int, delta: np.ndarray, *, base_version: int = 0, sample_weight: float = 1.0,
               mode: str = "dense", fraction: float = 1.0, max_message_bytes: int = 256 * 1024,
               shard_count: int | None = None, secret: LoadedContext | None = None,
               layout_fp: str | None = None) -> KitUpdate:
        """One update of ``delta`` built by the site's own builder, signed by ``site``."""
        from fedmq.shared.codec import encode_update_chunk
        from fedmq.site_agent.update_builder import UpdateIdentity, build_update

        ctx = secret or self.secret
        built = build_update(
            delta, None, UpdateIdentity(site, seq, base_version, sample_weight), ctx, layout_fp or self.layout_fp,
            self.site_key(site), mode=mode, fraction=fraction, max_message_bytes=max_message_bytes,
            shard_count=shard_count,
        )
        slots = ctx.block_size
        padded = np.zeros(-(-delta.size // slots) * slots)
        padded[: delta.size] = delta
        sent = {i: padded[i * slots:(i + 1) * slots].copy() for i in built.sent_indices}
        return KitUpdate([encode_update_chunk(c) for c in built.chunks], sent, built)

    # -- checking a fold ----------------------------------------------------------------------
    def decrypt(self, blocks: dict[int, bytes]) -> dict[int, np.ndarray]:
        """Block index -> decrypted values of wire-format ciphertexts (an aggregator's D)."""
        return {i: decrypt_block(self.secret, b) for i, b in blocks.items()}

    def decrypt_max_error(self, blocks: dict[int, bytes], expect: dict[int, np.ndarray], units: int) -> float:
        """Largest |decrypted - units * expected| over every block either side has (a block one
        side lacks counts as zeros there)."""
        zeros = np.zeros(self.block_size)
        err = 0.0
        for i in set(blocks) | set(expect):
            got = decrypt_block(self.secret, blocks[i]) if i in blocks else zeros
            err = max(err, float(np.abs(got - units * expect.get(i, zeros)).max()))
        return err
