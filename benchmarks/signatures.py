"""Signature and audit-chain costs (a ``make bench`` section, ``benchmarks.run``).

Measures, in one run:
- sizes: each half of the hybrid signature, the encoded hybrid, public and private key files;
- throughput: sign and verify per second for Ed25519 alone, ML-DSA-65 alone and the hybrid,
  over the 72-byte message both halves sign (shared.signing hashes the payload first);
- the aggregator's hot path: ``verify_chunk`` on a real multi-MiB update chunk (SHA-512 of the
  payload + both verifications) next to Ed25519-only verification of the same digest and to
  the engine's own time for the same update (decode, verify, WAL fsync, fold, commit);
- a site round: hybrid signing of one update plus verifying one version, as a share of the
  local training time measured by the ``overhead`` section when it ran;
- ``fedmq audit verify``'s core: a chain of 100 versions x 3 sites, verified from its file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _rate(fn: Callable[[], Any], min_s: float = 0.3, min_n: int = 20) -> float:
    """Operations per second of ``fn`` over at least ``min_n`` calls and ``min_s`` seconds."""
    n, t0 = 0, time.perf_counter()
    while n < min_n or time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def signature_costs(sz: Any, tmp: Path, overhead: dict[str, Any] | None = None) -> dict[str, Any]:
    from benchmarks.harness import build, engine_version_seconds, make_keys, median
    from fedmq.shared.audit import load_chain
    from fedmq.shared.codec import decode_update_chunk
    from fedmq.shared.signing import (
        SigningKey,
        generate_aggregator_key,
        load_private_key,
        load_public_key,
        payload_digest,
        sign,
        signing_payload,
        verify,
        verify_chunk,
    )

    key_dir = tmp / "sig-keys"
    priv_path, pub_path = generate_aggregator_key(key_dir)
    key: SigningKey = load_private_key(priv_path)
    pub = load_public_key(pub_path)
    import msgpack

    msg = b"fedmq/update-chunk/v1\x00" + payload_digest(b"x")
    hybrid = sign(key, "update-chunk", b"x")
    halves = msgpack.unpackb(hybrid, raw=False)
    ed_sig, ml_sig = key.ed25519.sign(msg), key.mldsa.sign(msg)
    sizes = {
        "ed25519_signature_bytes": len(halves["ed25519"]), "mldsa65_signature_bytes": len(halves["ml-dsa-65"]),
        "hybrid_signature_bytes": len(hybrid), "ed25519_public_key_bytes": len(pub.ed25519.public_bytes_raw()),
        "mldsa65_public_key_bytes": len(pub.mldsa.public_bytes_raw()), "public_key_file_bytes": pub_path.stat().st_size,
        "private_key_file_bytes": priv_path.stat().st_size,
    }
    rates = {
        "ed25519_sign_per_s": _rate(lambda: key.ed25519.sign(msg)),
        "ed25519_verify_per_s": _rate(lambda: pub.ed25519.verify(ed_sig, msg)),
        "mldsa65_sign_per_s": _rate(lambda: key.mldsa.sign(msg)),
        "mldsa65_verify_per_s": _rate(lambda: pub.mldsa.verify(ml_sig, msg)),
        "hybrid_sign_per_s": _rate(lambda: sign(key, "update-chunk", b"x")),
        "hybrid_verify_per_s": _rate(lambda: verify(pub, "update-chunk", b"x", hybrid)),
    }

    # the aggregator's hot path, on one real dense update of the fold section's size
    keys = make_keys(tmp / "sig-engine")
    delta = np.random.default_rng(7).uniform(-0.5, 0.5, sz.fold_params)
    bodies, built = build(keys, "hospital-1", 1, delta)
    chunks = [decode_update_chunk(b, max_bytes=len(b) + 1) for b in bodies]
    pinned = {"hospital-1": keys.signing["hospital-1"].public_key()}
    payloads = [signing_payload(c) for c in chunks]
    digests = [payload_digest(p) for p in payloads]
    ed_sigs = [keys.signing["hospital-1"].ed25519.sign(b"fedmq/update-chunk/v1\x00" + d) for d in digests]
    reps = max(1, sz.repeats)
    verify_s = median([_timed(lambda: [verify_chunk(c, pinned) for c in chunks]) for _ in range(reps)])
    hash_s = median([_timed(lambda: [payload_digest(signing_payload(c)) for c in chunks]) for _ in range(reps)])
    ed_only_s = median([_timed(lambda: [pinned["hospital-1"].ed25519.verify(s, b"fedmq/update-chunk/v1\x00" + d)
                                        for s, d in zip(ed_sigs, digests)]) for _ in range(reps)])
    engine_s = median([engine_version_seconds(keys, tmp / f"sig-engine-state-{i}", bodies, 1) for i in range(reps)])
    sign_update_s = median([_timed(lambda: [sign(keys.signing["hospital-1"], "update-chunk", p) for p in payloads])
                            for _ in range(reps)])

    # fedmq audit verify: 100 versions x 3 sites, a chain written by the aggregator's own code
    chain_dir = tmp / "sig-audit"
    audit_path = build_audit_chain(chain_dir, key, versions=100, sites=3)
    audit_s = median([_timed(lambda: load_chain(audit_path, pub)) for _ in range(reps)])
    assert load_chain(audit_path, pub).head == 100

    n_values = sz.fold_params
    train_s = (overhead or {}).get("train_s")
    # a site round: sign one update (its chunks) + verify one version message of the same size
    site_crypto_s = sign_update_s + verify_s
    return {
        "signatures": {
            **sizes, **rates,
            "update_chunks": len(chunks), "update_bytes": sum(map(len, bodies)), "update_values": n_values,
            "aggregator_verify_update_s": verify_s, "aggregator_hash_update_s": hash_s,
            "aggregator_ed25519_only_verify_update_s": ed_only_s + hash_s,
            "aggregator_engine_update_s": engine_s,
            "hybrid_verify_share_of_engine": verify_s / engine_s if engine_s else None,
            "hybrid_extra_vs_ed25519_share_of_engine": (verify_s - ed_only_s - hash_s) / engine_s if engine_s else None,
            "site_sign_update_s": sign_update_s,
            "site_sign_plus_verify_share_of_training": site_crypto_s / train_s if train_s else None,
            "audit_verify_100x3_s": audit_s, "audit_chain_bytes": audit_path.stat().st_size,
            "note": "median of this run's repeats; 2 shared cores, absolute times inflated",
        },
        "audit_verify_100x3_s": audit_s,
        "hybrid_verify_share_of_engine": verify_s / engine_s if engine_s else None,
    }


def build_audit_chain(state_dir: Path, key: Any, versions: int, sites: int) -> Path:
    """A chain file of ``versions`` records, each folding one update per site, written by the
    aggregator's AggregatorAudit (sign, link, fsync) with made-up digests and epsilons."""
    import hashlib

    from fedmq.aggregator.audit_log import AggregatorAudit
    from fedmq.shared.schema import Contributor

    audit = AggregatorAudit(state_dir, key)
    audit.recover(0)
    names = [f"hospital_{i + 1}" for i in range(sites)]
    for v in range(1, versions + 1):
        contributors = []
        for i, s in enumerate(names):
            uid = f"{s}:{v}"
            audit.note_update(uid, [{"ci": 0, "dg": hashlib.sha512(uid.encode()).digest()}])
            contributors.append(Contributor(site_id=s, update_id=uid, base_version=v - 1, staleness=i % 2,
                                            weight_units=64 - i, sample_weight=100.0))
        eps = {s: {"epsilon_spent": 0.01 * v, "epsilon_target": 1.2, "metrics_version": v - 1} for s in names}
        audit.commit(v, contributors, eps)
    return audit.file.path


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
