"""Fuzzing the aggregator's input: the decode-and-validate path in-process (hypothesis), and raw
AMQP publishes of garbage to a running aggregator (dead-lettered with a reason, no stall)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.experiments.faults.fuzz import fuzz_amqp, fuzz_engine

pytestmark = [pytest.mark.fault]


def test_engine_accept_never_raises_and_never_folds_garbage(tmp_path: Path) -> None:
    out = fuzz_engine(tmp_path, max_examples=300, seed=0)
    print(out)
    assert out["cases"] >= 300
    # every family of refusal is reached: decoding, schema, signature, and the ciphertext checks
    # (damaged ciphertexts signed again by the site)
    assert {"malformed", "bad-signature"} <= set(out["reasons"]) or len(out["reasons"]) >= 3
    assert len({r for r in out["reasons"] if r.startswith("ciphertext-")}) >= 4, out["reasons"]


@pytest.mark.broker
def test_poison_over_amqp_is_dead_lettered_and_aggregator_keeps_folding(tmp_path: Path, amqp_url: str) -> None:
    out = fuzz_amqp(amqp_url, tmp_path, n_random=36, seed=1)
    print(out)
    assert out["cases"] == out["dead_lettered"] == 36
    assert "oversize" in out["reasons"]
    assert any(r.startswith("ciphertext-") for r in out["reasons"]), out["reasons"]
