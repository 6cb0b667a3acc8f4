"""Every kind of bad input ends in the dead-letter queue with its reason header, and the
aggregator keeps folding good updates afterwards."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from fedmq.broker.topology import DEAD_LETTER_BODY_BYTES, ORIGINAL_SIZE_HEADER
from integration.aggregator_helpers import (
    LAYOUT_FP, AggregatorThread, GlobalListener, declare_topology, drain_dead_letters, make_federation, publish,
    random_delta,
)
from fedmq.shared.codec import decode_update_chunk, decode_rejection, encode_update_chunk
from fedmq.shared.ckks import init_keys, load_context
from fedmq.shared.signing import generate_site_key, load_private_key, private_key_path, sign_chunk

pytestmark = pytest.mark.broker


def _site(ctx):
    return ctx["case"].replace("_", "-")


def _good(fed, ctx, seq, base=None, site=None, **kw):
    base = ctx["agg"].engine.version if base is None else base
    return fed.update(site or _site(ctx), seq, base, random_delta(ctx["rng"], fed.n_params), **kw)[0]


def _wait_version(ctx, version):
    ctx["listener"].wait_for(lambda v: v["version"] == version and v["mode"] == "delta", timeout=20)


def case_undecodable(fed, ctx):
    return [b"\xc1\xc1 not msgpack"], "malformed"


def case_oversize(fed, ctx):
    return [b"\x00" * (300 * 1024)], "oversize"


def case_schema_version(fed, ctx):
    obj = msgpack.unpackb(_good(fed, ctx, 1)[0], raw=False)
    obj["schema_version"] = 2
    return [msgpack.packb(obj, use_bin_type=True)], "schema-version"


def case_key_fingerprint(fed, ctx):
    other = load_context(init_keys(fed.root / "other-key").secret_context, require_secret=True)
    return _good(fed, ctx, 1, secret=other)[:1], "key-fingerprint"


def case_layout_fingerprint(fed, ctx):
    return _good(fed, ctx, 1, layout_fp="some-other-layout-0000")[:1], "layout-fingerprint"


def case_unknown_site(fed, ctx):
    if "zulu" not in fed.signing:
        generate_site_key(fed.root / "rogue", "zulu")
        fed.signing["zulu"] = load_private_key(private_key_path(fed.root / "rogue", "zulu"))
    return _good(fed, ctx, 1, site="zulu")[:1], "unknown-site"


def case_bad_signature(fed, ctx):
    chunk = decode_update_chunk(_good(fed, ctx, 1)[0])
    forged = chunk.model_copy(update={"sample_weight": 1000.0})  # altered after signing
    return [encode_update_chunk(forged)], "bad-signature"


def _strip_half(fed, ctx, half):
    chunk = decode_update_chunk(_good(fed, ctx, 1)[0])
    sig = msgpack.unpackb(chunk.signature, raw=False)
    del sig[half]  # the other half stays valid: a downgrade attempt
    return [encode_update_chunk(chunk.model_copy(update={"signature": msgpack.packb(sig, use_bin_type=True)}))]


def case_mldsa_missing(fed, ctx):
    return _strip_half(fed, ctx, "ml-dsa-65"), "bad-signature"


def case_ed25519_missing(fed, ctx):
    return _strip_half(fed, ctx, "ed25519"), "bad-signature"


def case_wrong_key(fed, ctx):
    from fedmq.shared.signing import sign_chunk

    chunk = decode_update_chunk(_good(fed, ctx, 1)[0])
    return [encode_update_chunk(sign_chunk(chunk, fed.signing["charlie"]))], "bad-signature"  # charlie's key


def _with_ciphertext(fed, ctx, damage):
    """A chunk whose first ciphertext is damaged *before* the site signs it (a broken or
    misconfigured site): the signature verifies, the ciphertext check must refuse it."""
    chunk = decode_update_chunk(_good(fed, ctx, 1)[0])
    first, *rest = chunk.blocks
    bad = first.model_copy(update={"ciphertext": damage(first.ciphertext)})
    return [encode_update_chunk(sign_chunk(chunk.model_copy(update={"blocks": (bad, *rest)}), fed.signing[_site(ctx)]))]


def _flip(ct):
    out = bytearray(ct)
    out[5000] ^= 0x10
    return bytes(out)


def case_ciphertext_malformed(fed, ctx):
    return _with_ciphertext(fed, ctx, lambda ct: b"\x00garbage" + ct[9:]), "ciphertext-malformed"


def case_ciphertext_truncated(fed, ctx):
    return _with_ciphertext(fed, ctx, lambda ct: ct[:-100]), "ciphertext-truncated"


def case_ciphertext_bit_flip(fed, ctx):
    return _with_ciphertext(fed, ctx, _flip), "ciphertext-corrupt"


def case_ciphertext_seed_length(fed, ctx):
    return _with_ciphertext(fed, ctx, lambda ct: ct[:17] + bytes([32]) + ct[18:]), "ciphertext-seed"


def case_ciphertext_parameters(fed, ctx):
    return _with_ciphertext(fed, ctx, lambda ct: ct[:3] + bytes([ct[3] ^ 0x7F]) + ct[4:]), "ciphertext-params"


def case_ciphertext_other_key(fed, ctx):
    """Encrypted under another key but labelled with the federation's fingerprint."""
    other = load_context(init_keys(fed.root / "other-key-ct").secret_context, require_secret=True)
    foreign = decode_update_chunk(_good(fed, ctx, 1, secret=other)[0])
    return _with_ciphertext(fed, ctx, lambda ct: foreign.blocks[0].ciphertext), "ciphertext-key"


def case_headroom(fed, ctx):
    """A weight so large that the buffer's sum could wrap the CKKS modulus."""
    return _good(fed, ctx, 1, sample_weight=5000.0)[:1], "headroom"


def case_future_version(fed, ctx):
    return _good(fed, ctx, 1, base=ctx["agg"].engine.version + 7)[:1], "future-version"


def case_too_stale(fed, ctx):
    v = ctx["agg"].engine.version
    publish(ctx["url"], _good(fed, ctx, 1))
    _wait_version(ctx, v + 1)
    publish(ctx["url"], _good(fed, ctx, 2))
    _wait_version(ctx, v + 2)
    return _good(fed, ctx, 3, base=v)[:1], "too-stale"  # max_staleness=1, staleness 2


def case_duplicate(fed, ctx):
    v = ctx["agg"].engine.version
    bodies = _good(fed, ctx, 1)
    publish(ctx["url"], bodies)
    _wait_version(ctx, v + 1)
    return bodies[:1], "duplicate"


def case_replay(fed, ctx):
    v = ctx["agg"].engine.version
    publish(ctx["url"], _good(fed, ctx, 5))
    _wait_version(ctx, v + 1)
    return _good(fed, ctx, 3)[:1], "sequence-backwards"  # an older sequence number, never seen: state lost


def case_incomplete(fed, ctx):
    bodies = _good(fed, ctx, 1, max_message_bytes=40_000)
    assert len(bodies) > 1
    return bodies[:-1], "incomplete"


CASES = {f.__name__.removeprefix("case_"): f for f in (
    case_undecodable, case_oversize, case_schema_version, case_key_fingerprint, case_layout_fingerprint,
    case_unknown_site, case_bad_signature, case_mldsa_missing, case_ed25519_missing, case_wrong_key,
    case_future_version, case_too_stale, case_duplicate, case_replay,
    case_incomplete, case_ciphertext_malformed, case_ciphertext_truncated, case_ciphertext_bit_flip,
    case_ciphertext_seed_length, case_ciphertext_parameters, case_ciphertext_other_key, case_headroom,
)}


#: the refusal names which half of the hybrid signature failed
DETAILS = {"mldsa_missing": "ML-DSA-65 signature missing", "ed25519_missing": "Ed25519 signature missing",
           "wrong_key": "Ed25519 signature does not verify"}


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    sites = ("charlie", *(name.replace("_", "-") for name in CASES))
    return make_federation(tmp_path_factory.mktemp("fed"), sites=sites)


@pytest.fixture(scope="module")
def running(fed, broker, tmp_path_factory):
    """One vhost and one aggregator for all cases (a vhost costs seconds of rabbitmqctl)."""
    ns = broker.new_namespace("aggregator-rejections")
    settings = fed.settings(tmp_path_factory.mktemp("state"), amqp_url=ns.url, buffer_size=1, max_staleness=1,
                            layout_fingerprint=LAYOUT_FP, incomplete_timeout_s=1.0,
                            # the headroom case needs the raw unit formula (w_ref = 1), not the mean of reports
                            reference_sample_weight=1.0)
    declare_topology(ns.url)
    listener = GlobalListener(ns.url)
    try:
        with AggregatorThread(settings) as agg:
            yield {"url": ns.url, "listener": listener, "agg": agg, "charlie_seq": 0}
    finally:
        listener.close()
        broker.drop_namespace(ns)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_dead_lettered_with_reason(case, fed, running):
    from fedmq.broker.topology import DEAD_LETTER_QUEUE
    from integration.aggregator_helpers import connect

    ctx = dict(running, case=case, rng=np.random.default_rng(len(case)))
    agg, amqp_url = running["agg"], running["url"]
    conn = connect(amqp_url)
    conn.channel().queue_purge(DEAD_LETTER_QUEUE)
    conn.close()
    bodies, reason = CASES[case](fed, ctx)
    version_before = agg.engine.version
    count_before = agg.engine.metrics.reason_counts.get(reason, 0)
    publish(amqp_url, bodies)
    dead = drain_dead_letters(amqp_url, 1)
    assert dead, f"nothing dead-lettered for {case}"
    headers, body = dead[0]
    assert headers["x-fedmq-reason"] == reason, headers
    assert headers["x-fedmq-detail"]
    if case in DETAILS:
        assert DETAILS[case] in str(headers["x-fedmq-detail"]), headers
    if reason == "incomplete":
        assert decode_rejection(body).update_id == f"{_site(ctx)}:1"
    else:  # the original headers and (the first KiB of) its bytes travel with the reason
        assert body == bodies[0][:DEAD_LETTER_BODY_BYTES]
        assert headers.get(ORIGINAL_SIZE_HEADER) == (len(bodies[0]) if len(bodies[0]) > DEAD_LETTER_BODY_BYTES else None)
    assert agg.engine.metrics.reason_counts.get(reason) == count_before + 1
    assert agg.engine.version == version_before, "nothing of a refused input is folded"
    # still alive: a good update from charlie is folded into the next version
    running["charlie_seq"] += 1
    publish(amqp_url, _good(fed, ctx, running["charlie_seq"], site="charlie"))
    _wait_version(ctx, version_before + 1)


def test_dead_letter_copy_keeps_headers_and_one_kib(running):
    """A refused 300 KiB message is not duplicated into the dead-letter queue: its copy keeps
    the sender's headers, gains the reason and the original size, and holds the first KiB."""
    import pika

    from fedmq.broker.topology import DEAD_LETTER_QUEUE, UPDATES_EXCHANGE, shard_key
    from integration.aggregator_helpers import connect

    url = running["url"]
    conn = connect(url)
    try:
        ch = conn.channel()
        ch.queue_purge(DEAD_LETTER_QUEUE)
        ch.confirm_delivery()
        body = bytes(range(256)) * 1200  # 300 KiB, over the aggregator's 256 KiB chunk limit
        ch.basic_publish(UPDATES_EXCHANGE, shard_key(0), body,
                         pika.BasicProperties(headers={"x-trace": "attack-4"}, type="update-chunk", delivery_mode=2))
    finally:
        conn.close()
    dead = drain_dead_letters(url, 1)
    assert dead, "the refused message was not dead-lettered"
    headers, copy = dead[0]
    assert headers["x-fedmq-reason"] == "oversize" and headers["x-trace"] == "attack-4"
    assert headers[ORIGINAL_SIZE_HEADER] == len(body)
    assert copy == body[:DEAD_LETTER_BODY_BYTES]
