"""Fuzzing the aggregator's input: the *run* half of ``fedmq faults run`` for hostile input.

``fuzz_engine`` throws Hypothesis-generated bodies (random bytes, msgpack of random structures,
mutated, truncated and spliced genuine chunks) and a corpus of damaged ciphertexts, signed again
by the site, at ``AggregatorEngine.accept``; ``fuzz_amqp`` publishes random, truncated,
oversized and mislabelled messages to a running aggregator over the broker. Each checks its
properties as it runs (every refusal carries a reason, nothing but a genuine chunk is folded,
the genuine update still folds afterwards, exactly once) and raises
:class:`~experiments.faults.plan.FaultCheckFailed` on the first violation.

Hypothesis is a development dependency (the ``dev`` extra): it is imported when this module
is, so ``fedmq faults run`` stops at once with what to install, not after its long live run.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.broker import topology
from fedmq.broker.transport import Message
from fedmq.experiments.faults.federation import admin_link
from fedmq.experiments.faults.plan import FaultCheckFailed
from fedmq.experiments.testkit import UpdateKit
from fedmq.shared.errors import ConfigError

try:
    import msgpack
    from hypothesis import HealthCheck, given, seed as hseed, settings as hsettings, strategies as st
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ConfigError(
        f"fedmq faults fuzzes with Hypothesis, a development dependency ({exc.name} is missing): "
        "install the dev extra (pip install -e '.[dev]', or make venv) and run it again"
    ) from None


def check(ok: bool, what: str) -> None:
    """A property of the fuzzing that must hold (not an ``assert``: it runs with ``-O`` too)."""
    if not ok:
        raise FaultCheckFailed(what)


class FuzzKit:
    """The fuzzers' federation, on the test kit (``fedmq.experiments.testkit``): one site (``alpha``),
    a dense update of three blocks and a bit (so it spans several chunks), and an aggregator
    that folds every update at once."""

    __test__ = False

    def __init__(self, kit: UpdateKit, site: str, n_params: int) -> None:
        self.kit, self.site, self.n_params = kit, site, n_params
        self.signing = kit.site_key(site)

    @classmethod
    def create(cls, root: Path, n_params: int | None = None, site: str = "alpha") -> FuzzKit:
        kit = UpdateKit.create(root, layout_fp="layout-fuzz-0001")
        return cls(kit, site, 3 * kit.block_size + 100 if n_params is None else n_params)

    @property
    def secret(self) -> Any:
        return self.kit.secret

    def settings(self, state_dir: Path | str, **over: Any) -> Any:
        base: dict[str, Any] = dict(buffer_size=1, housekeeping_s=0.2, incomplete_timeout_s=30.0,
                                    max_message_bytes=256 * 1024, staleness_exponent=0.0, max_staleness=10_000)
        base.update(over)
        return self.kit.settings(state_dir, **base)

    def update(self, seq: int, rng: np.random.Generator,
               max_message_bytes: int = 100_000) -> tuple[list[bytes], dict[int, np.ndarray]]:
        """A genuine dense update of a random delta: its chunks and the plaintext blocks it carries."""
        u = self.kit.update(self.site, seq, rng.uniform(-0.5, 0.5, self.n_params), max_message_bytes=max_message_bytes)
        return u.bodies, u.sent

    def decrypt_max_error(self, blocks: dict[int, bytes], expect: dict[int, np.ndarray], units: int) -> float:
        return self.kit.decrypt_max_error(blocks, expect, units)


def damage_ciphertext(ct: bytes, how: int, pos: int, junk: bytes, foreign: bytes) -> bytes:
    """One of the ways a ciphertext can be damaged (``fedmq.shared.ckks_wire``'s layout): truncated,
    bit-flipped, spliced, wrong seed length, wrong parameters byte, another key's ciphertext."""
    how %= 6
    if how == 0:
        return ct[: pos % len(ct)]
    if how == 1:
        b = bytearray(ct)
        b[pos % len(b)] ^= 1 << (pos % 8)
        return bytes(b)
    if how == 2:
        p = pos % (len(ct) + 1)
        return ct[:p] + junk + ct[p:]
    if how == 3:
        return ct[:17] + bytes([(64 + 1 + pos) % 64 or 1]) + ct[18:]  # any seed length but 64
    if how == 4:
        return ct[:3] + bytes([ct[3] ^ (1 + pos % 255)]) + ct[4:]
    return foreign


def resign_with_ciphertext(kit: FuzzKit, body: bytes, damage: Any) -> bytes:
    """The chunk with its first block's ciphertext replaced by ``damage(ct)``, signed again by the
    site: a broken site, whose signature verifies, so only the ciphertext checks can refuse it."""
    from fedmq.shared.codec import decode_update_chunk, encode_update_chunk
    from fedmq.shared.signing import sign_chunk

    chunk = decode_update_chunk(body, max_bytes=1 << 24)
    first, *rest = chunk.blocks
    bad = first.model_copy(update={"ciphertext": damage(first.ciphertext)})
    return encode_update_chunk(sign_chunk(chunk.model_copy(update={"blocks": (bad, *rest)}), kit.signing))


def _mutations(valid: list[bytes], resign: Any = None):  # type: ignore[no-untyped-def]
    """Hypothesis strategy of bodies: random bytes, msgpack of random structures, mutated valid chunks
    and (with ``resign``) valid chunks whose ciphertext is damaged and signed again."""
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
                     st.text(max_size=20), st.binary(max_size=64))
    tree = st.recursive(leaf, lambda kids: st.one_of(st.lists(kids, max_size=6),
                                                      st.dictionaries(st.text(max_size=12), kids, max_size=6)), max_leaves=24)
    base = st.sampled_from(valid)

    def flip(args: tuple[bytes, int, int]) -> bytes:
        b, pos, bit = args
        b = bytearray(b)
        b[pos % len(b)] ^= 1 << bit
        return bytes(b)

    def splice(args: tuple[bytes, int, bytes]) -> bytes:
        b, pos, junk = args
        p = pos % (len(b) + 1)
        return b[:p] + junk + b[p:]

    def field_swap(args: tuple[bytes, str, Any]) -> bytes:
        b, key, value = args
        try:
            obj = msgpack.unpackb(b, raw=False, strict_map_key=False)
        except Exception:
            return b
        if isinstance(obj, dict) and obj:
            k = key if key in obj or not obj else sorted(obj, key=str)[hash(key) % len(obj)]
            obj[k] = value
        return msgpack.packb(obj, use_bin_type=True)

    def drop_field(args: tuple[bytes, int]) -> bytes:
        b, n = args
        try:
            obj = msgpack.unpackb(b, raw=False, strict_map_key=False)
        except Exception:
            return b
        if isinstance(obj, dict) and obj:
            obj.pop(sorted(obj, key=str)[n % len(obj)])
        return msgpack.packb(obj, use_bin_type=True)

    return st.one_of(
        st.binary(max_size=2048),
        tree.map(lambda t: msgpack.packb(t, use_bin_type=True)),
        st.tuples(base, st.integers(0, 1 << 30)).map(lambda a: a[0][: a[1] % len(a[0])]),  # truncated
        st.tuples(base, st.integers(0, 1 << 30), st.integers(0, 7)).map(flip),
        st.tuples(base, st.integers(0, 1 << 30), st.binary(min_size=1, max_size=32)).map(splice),
        st.tuples(base, st.text(max_size=16), tree).map(field_swap),
        st.tuples(base, st.integers(0, 100)).map(drop_field),
        *([st.tuples(base, st.integers(0, 5), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=32)).map(
            lambda a: resign(*a))] if resign else []),
    )


def fuzz_engine(root: Path, max_examples: int = 500, seed: int = 0) -> dict[str, Any]:
    """Property: ``accept`` on any bytes returns a Decision (never raises), never folds garbage,
    and the engine still folds the genuine update afterwards, exactly once."""
    from fedmq.aggregator.engine import AggregatorEngine, Decision
    from fedmq.shared.codec import decode_update_chunk

    kit = FuzzKit.create(root)
    rng = np.random.default_rng(seed)
    chunks, sent = kit.update(1, rng)
    originals = [decode_update_chunk(b, max_bytes=1 << 24) for b in chunks]
    foreign = _foreign_ciphertext(root)
    engine = AggregatorEngine(kit.settings(root / "state"))
    reasons: Counter = Counter()
    stats = {"cases": 0, "accepted_equivalent": 0}

    @hseed(seed)
    @hsettings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_mutations(chunks))
    def case(body: bytes) -> None:
        stats["cases"] += 1
        d = engine.accept(body, user_id=None, redelivered=False)
        check(isinstance(d, Decision) and d.action in ("accept", "reject", "drop"), f"accept returned {d!r}")
        if d.action == "accept":
            # only a re-encoding of a genuine chunk can pass the signature: it is that chunk
            check(d.chunk is not None and any(d.chunk == o for o in originals), "accepted a chunk that is not genuine")
            stats["accepted_equivalent"] += 1
            engine.apply(d)
        else:
            reasons[d.reason] += 1

    try:
        case()
        # the ciphertext corpus: every kind of damage, at spread positions, signed again by the site
        # (so the signature verifies and only the ciphertext checks stand between it and the fold)
        prng = random.Random(seed)
        for how in range(6):
            for _ in range(8):
                pos, junk = prng.randrange(1 << 30), prng.randbytes(prng.randint(1, 32))
                body = resign_with_ciphertext(kit, prng.choice(chunks),
                                              lambda ct: damage_ciphertext(ct, how, pos, junk, foreign))
                stats["cases"] += 1
                d = engine.accept(body, user_id=None, redelivered=False)
                if d.action != "reject" or not d.reason.startswith("ciphertext-"):
                    raise FaultCheckFailed(f"damaged ciphertext (kind {how}) not refused as one: {d.action} {d.reason}")
                reasons[d.reason] += 1
        # the genuine update still goes through, once
        for b in chunks:
            d = engine.accept(b, user_id=None, redelivered=False)
            engine.apply(d)
        check(engine.version == 1, f"the genuine update was not folded (version {engine.version})")
        err = kit.decrypt_max_error(engine.D.data, sent, 64)
        check(err < 1e-3, f"folded state differs from the genuine update by {err}")
        counted = [u for _, ids in engine.recent for u in ids]
        check(counted == [f"{kit.site}:1"], f"counted {counted}, not the genuine update once")
    finally:
        engine.close()
    return {"cases": stats["cases"], "accepted_equivalent": stats["accepted_equivalent"], "reasons": dict(reasons)}


def _foreign_ciphertext(root: Path) -> bytes:
    """A ciphertext made under another key (same preset), for the "another key" case."""
    from fedmq.shared.ckks import encrypt_block, init_keys, load_context

    other = load_context(init_keys(root / "foreign-key").secret_context, require_secret=True)
    return encrypt_block(other, np.linspace(-1, 1, 64))


def fuzz_amqp(url: str, root: Path, n_random: int = 60, seed: int = 0) -> dict[str, Any]:
    """Raw publishes to a running aggregator: random bytes, truncated and oversized messages,
    wrong content types and headers. Every one is dead-lettered with a reason header, the
    aggregator stays up and still folds a genuine update afterwards (exactly once)."""
    from fedmq.aggregator.consumer import AggregatorService

    kit = FuzzKit.create(root)
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    chunks, sent = kit.update(1, rng)
    settings = kit.settings(root / "state", amqp_url=url, reconnect_initial_s=0.2, reconnect_max_s=1.0)
    link = admin_link(url)
    link.declare(topology.EXCHANGES, topology.aggregator_queue_specs())
    bad: list[Message] = []

    def message(body: bytes, *, content_type: str | None, headers: dict[str, Any], kind: str | None = None,
                **extra: Any) -> Message:
        return Message(topology.UPDATES_EXCHANGE, topology.shard_key(0), body, kind=kind, content_type=content_type,
                       headers=headers, mandatory=True, extra={k: v for k, v in extra.items() if v is not None})

    junk_types = ["text/plain", "application/json", "", "application/x-msgpack; charset=evil", "\u00e9\u00e8" * 10]
    foreign = _foreign_ciphertext(root)
    for i in range(n_random):
        kind = i % 7
        if kind == 0:
            body = prng.randbytes(prng.randint(0, 4096))
        elif kind == 1:
            c = prng.choice(chunks)
            body = c[: prng.randint(0, len(c) - 1)]
        elif kind == 2:
            c = bytearray(prng.choice(chunks))
            for _ in range(prng.randint(1, 8)):
                c[prng.randrange(len(c))] ^= 1 << prng.randrange(8)
            body = bytes(c)
        elif kind == 3:
            body = prng.randbytes(300 * 1024)  # oversized (limit 256 KiB)
        elif kind == 4:
            body = json.dumps({"kind": "update_chunk", "site_id": kit.site, "n": i}).encode()
        elif kind == 5:  # a signed chunk whose ciphertext is damaged (or another key's)
            how, pos, junk = prng.randrange(6), prng.randrange(1 << 30), prng.randbytes(prng.randint(1, 32))
            body = resign_with_ciphertext(kit, prng.choice(chunks),
                                          lambda ct: damage_ciphertext(ct, how, pos, junk, foreign))
        else:
            body = b""
        hdrs = {"x-fuzz": prng.choice([1, "two", -7, True, b"\x00\x01", {"nested": [1, 2, {"x": None}]}])}
        if i % 4 == 0:
            hdrs[topology.REASON_HEADER] = "spoofed"
        bad.append(message(body, content_type=prng.choice(junk_types), headers=hdrs,
                           kind=prng.choice(["update-chunk", "x", None]), priority=prng.choice([None, 0, 9]),
                           message_id=f"fuzz-{i}"))
    svc = AggregatorService(settings)
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        if not svc.ready.wait(30):
            raise FaultCheckFailed("aggregator did not connect")
        for m in bad:
            link.publish(m)
        # a genuine update with odd properties afterwards: the content type is advisory, the body decides
        for b in chunks:
            link.publish(message(b, content_type="text/plain", headers={"x-junk": "y"}))
        deadline = time.monotonic() + 60
        while svc.engine.version < 1 and time.monotonic() < deadline:
            if not thread.is_alive():
                raise FaultCheckFailed("the aggregator thread died")
            time.sleep(0.1)
        check(svc.engine.version == 1, "the genuine update was not folded after the poison")
        reasons: Counter = Counter()
        missing_reason = 0
        got = 0
        deadline = time.monotonic() + 30
        while got < len(bad) and time.monotonic() < deadline:
            delivery = link.get(topology.DEAD_LETTER_QUEUE)
            if delivery is None:
                link.process(0.1)
                continue
            got += 1
            r = delivery.headers.get(topology.REASON_HEADER)
            if not r or r == "spoofed":
                missing_reason += 1
            reasons[str(r)] += 1
        check(got == len(bad), f"{got} of {len(bad)} poison messages were dead-lettered")
        check(missing_reason == 0, "a dead letter lacks the aggregator's reason header")
        check(thread.is_alive() and svc.ready.is_set(), "the aggregator stopped consuming")
        err = kit.decrypt_max_error(svc.engine.D.data, sent, 64)
        check(err < 1e-3, f"folded state differs from the genuine update by {err}")
        check(svc.engine.updates_folded_total == 1,
              f"{svc.engine.updates_folded_total} updates folded where the genuine one alone should be")
    finally:
        svc.stop()
        thread.join(30)
        link.close()
    return {"cases": len(bad), "dead_lettered": got, "reasons": dict(reasons)}


