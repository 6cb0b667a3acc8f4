"""Fold maths: integer staleness weights, encrypted fold vs plaintext, reconstruction of x_v."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from fedmq.aggregator.fold import (
    commit, commit_plain, fold_into, fold_plain, reconstruct, staleness_weight, value_scale, weight_units,
)
from fedmq.shared.sharding import block_shard, owned_blocks
from fedmq.shared.ckks import decrypt_block, encrypt_block, init_keys, load_ciphertext, load_context, serialize


def test_staleness_weight_values():
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert staleness_weight(3, 0.0) == 1.0
    with pytest.raises(ValueError):
        staleness_weight(-1, 0.5)


@given(st.integers(0, 1000), st.floats(1e-3, 1e4), st.integers(1, 1024), st.floats(0, 3))
@hsettings(max_examples=200, deadline=None)
def test_weight_units_is_rounded_product_and_at_least_one(tau, w, q, a):
    m = weight_units(tau, w, quantum=q, exponent=a, reference_sample_weight=1.0)
    assert m >= 1 and isinstance(m, int)
    assert abs(m - max(1, q * (1 + tau) ** -a * w)) <= 0.5 + 1e-9 or m == 1


def test_weight_units_monotone_in_staleness():
    ms = [weight_units(t, 1.0, quantum=64, exponent=0.5, reference_sample_weight=1.0) for t in range(10)]
    assert ms[0] == 64 and ms == sorted(ms, reverse=True)


def test_value_scale_and_shards():
    assert value_scale(1.0, 64, 4) == 1 / 256
    total = 10
    owned = [owned_blocks(total, i, 3) for i in range(3)]
    assert sorted(b for o in owned for b in o) == list(range(total))
    assert all(block_shard(b, total, 3) == i for i, o in enumerate(owned) for b in o)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    keys = init_keys(tmp_path_factory.mktemp("keys"))
    return load_context(keys.secret_context, require_secret=True), load_context(keys.public_context, require_secret=False)


def test_encrypted_fold_matches_plaintext_fedbuff(contexts):
    secret, public = contexts
    rng = np.random.default_rng(7)
    slots = public.block_size
    n_blocks, K, Q = 4, 3, 64
    D, buf, pD, pbuf = {}, {}, {}, {}
    current = 0
    for step in range(9):
        # sparse updates: a random subset of blocks, random staleness and sample weight
        idx = sorted(rng.choice(n_blocks, size=rng.integers(1, n_blocks + 1), replace=False).tolist())
        values = {i: rng.uniform(-1, 1, slots) for i in idx}
        tau = int(rng.integers(0, 4))
        m = weight_units(tau, float(rng.uniform(0.5, 2)), quantum=Q, exponent=0.5, reference_sample_weight=1.0)
        # the site encrypts with the secret context; the aggregator loads with the public one
        fold_into(buf, [(i, load_ciphertext(public, encrypt_block(secret, v))) for i, v in values.items()], m)
        fold_plain(pbuf, values, m)
        if (step + 1) % K == 0:
            assert commit(D, buf) == commit_plain(pD, pbuf)
            current += 1
            assert not buf
    scale = value_scale(0.5, Q, K)
    n = n_blocks * slots - 17
    x0 = rng.normal(size=n)
    dec = {i: decrypt_block(secret, serialize(v)) for i, v in D.items()}
    np.testing.assert_allclose(reconstruct(x0, dec, scale, slots), reconstruct(x0, pD, scale, slots), atol=1e-6)


def test_fold_into_unit_weight_keeps_vector(contexts):
    secret, public = contexts
    v = load_ciphertext(public, encrypt_block(secret, np.ones(3)))
    buf = {}
    fold_into(buf, [(0, v)], 1)
    fold_into(buf, [(0, load_ciphertext(public, encrypt_block(secret, np.ones(3))))], 5)
    np.testing.assert_allclose(decrypt_block(secret, serialize(buf[0]))[:3], 6.0, atol=1e-6)
