"""fedmq.shared.audit: the hash-chained, aggregator-signed audit log and its offline checks."""

from __future__ import annotations

import msgpack
import pytest

from fedmq.shared.audit import (
    GENESIS_HASH,
    AuditChain,
    AuditFork,
    AuditGap,
    AuditSignatureInvalid,
    ChainFile,
    find_update,
    load_chain,
    prove_inclusion,
    record_hash,
    sign_record,
    update_digest,
)
from fedmq.shared.audit_cli import tables
from fedmq.shared.cli import main
from fedmq.shared.schema import AuditContribution, AuditEpsilon, AuditRecord
from fedmq.shared.signing import generate_aggregator_key, load_private_key, new_signing_key

SITES = ("hospital_1", "hospital_2", "hospital_3")


def make_chain(key, n: int, sites=SITES) -> list[AuditRecord]:  # type: ignore[no-untyped-def]
    """n signed, linked records, each folding one update per site."""
    out, prev = [], GENESIS_HASH
    for v in range(1, n + 1):
        contributions = tuple(
            AuditContribution(site_id=s, update_id=f"{s}:{v}", ciphertext_digest=update_digest(
                [f"{s}{v}".encode()]), base_version=v - 1, staleness=i % 2,
                weight_units=64 - i)
            for i, s in enumerate(sites)
        )
        epsilons = tuple(AuditEpsilon(site_id=s, epsilon_spent=0.01 * v, epsilon_target=1.2, reported_at_version=v - 1)
                         for s in sites)
        rec = sign_record(AuditRecord(version=v, prev_hash=prev, signer=key.public_key().fingerprint,
                                      contributions=contributions, epsilons=epsilons,
                                      weight_units_sum=sum(c.weight_units for c in contributions),
                                      created_at=1.0 + v), key)
        out.append(rec)
        prev = record_hash(rec)
    return out


@pytest.fixture(scope="module")
def key():  # type: ignore[no-untyped-def]
    return new_signing_key()


@pytest.fixture(scope="module")
def records(key):  # type: ignore[no-untyped-def]
    return make_chain(key, 6)


def test_whole_chain_verifies(key, records) -> None:  # type: ignore[no-untyped-def]
    chain = AuditChain(key.public_key())
    assert chain.extend(records) == records
    assert chain.head == 6 and chain.head_hash == record_hash(records[-1])
    assert chain.extend(records[2:4]) == []  # records already held, identical: nothing new


def test_tampered_record_is_refused(key, records) -> None:  # type: ignore[no-untyped-def]
    bad = records[2].model_copy(update={"epsilons": ()})  # hide what the sites spent
    with pytest.raises(AuditSignatureInvalid, match="version 3"):
        AuditChain(key.public_key()).extend([*records[:2], bad])


def test_missing_record_is_a_gap(key, records) -> None:  # type: ignore[no-untyped-def]
    chain = AuditChain(key.public_key())
    chain.extend(records[:2])
    with pytest.raises(AuditGap, match="version 4 does not follow version 2"):
        chain.extend(records[3:])
    assert chain.head == 2  # nothing half-applied


def test_reordered_chain_is_refused(key, records) -> None:  # type: ignore[no-untyped-def]
    chain = AuditChain(key.public_key())
    chain.extend(records[:2])
    with pytest.raises(AuditFork, match="reordered"):
        chain.extend([records[3], records[2]])


def test_fork_is_refused(key, records) -> None:  # type: ignore[no-untyped-def]
    chain = AuditChain(key.public_key())
    chain.extend(records[:3])
    other = make_chain(key, 3, sites=("hospital_1",))  # a second, validly signed history
    with pytest.raises(AuditFork, match="version 2 differs"):
        chain.extend(other[1:])
    forked4 = sign_record(records[3].model_copy(update={"prev_hash": record_hash(other[2])}), key)
    with pytest.raises(AuditFork, match="does not link"):
        chain.extend([forked4])


def test_signature_from_the_wrong_key(key, records) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AuditSignatureInvalid, match="version 1"):
        AuditChain(new_signing_key().public_key()).extend(records[:1])


@pytest.mark.parametrize(("half", "message"), [("ml-dsa-65", "ML-DSA-65 signature missing"),
                                                ("ed25519", "Ed25519 signature missing")])
def test_half_signature_is_refused(key, records, half: str, message: str) -> None:  # type: ignore[no-untyped-def]
    sig = msgpack.unpackb(records[0].signature, raw=False)
    del sig[half]
    stripped = records[0].model_copy(update={"signature": msgpack.packb(sig, use_bin_type=True)})
    with pytest.raises(AuditSignatureInvalid, match=f"version 1: {message}"):
        AuditChain(key.public_key()).extend([stripped])


def test_site_joining_late_anchors_on_a_signed_record(key, records) -> None:  # type: ignore[no-untyped-def]
    chain = AuditChain(key.public_key(), anchor_ok=True)
    chain.extend(records[3:])
    assert (chain.base, chain.head) == (3, 6)
    with pytest.raises(AuditGap):
        AuditChain(key.public_key()).extend(records[3:])  # a verifier from genesis does not


def test_chain_file_survives_a_torn_append(tmp_path, key, records) -> None:  # type: ignore[no-untyped-def]
    f = ChainFile(tmp_path / "audit-chain.log")
    f.append(records[:4])
    with open(f.path, "ab") as fh:
        fh.write(b"\x00\x00\x10\x00partial")
    assert [r.version for r in f.read()] == [1, 2, 3, 4]
    assert [r.version for r in f.truncate_to(2)] == [1, 2]
    assert load_chain(f.path, key.public_key()).head == 2


def test_proof_of_inclusion(key, records) -> None:  # type: ignore[no-untyped-def]
    chain = AuditChain(key.public_key())
    chain.extend(records)
    digest = records[2].contributions[1].ciphertext_digest
    yes = prove_inclusion(chain, 3, "hospital_2:3", digest)
    assert yes.included and yes.digest_matches
    assert "was folded into version 3" in yes.describe()
    no = prove_inclusion(chain, 4, "hospital_2:3", digest)
    assert not no.included and "was NOT folded into version 4" in no.describe()
    assert prove_inclusion(chain, 3, "hospital_2:3", "0" * 64).digest_matches is False
    assert find_update(chain, "hospital_3:5") == 5 and find_update(chain, "hospital_3:99") is None


def test_tables_list_contributions_and_epsilon(records) -> None:  # type: ignore[no-untyped-def]
    text = tables(records)
    assert "hospital_2: contributions" in text and "hospital_2:4" in text
    assert "epsilon reported, per version" in text and "0.060" in text
    md = tables(records, markdown=True)
    assert "| version | hospital_1 | hospital_2 | hospital_3 |" in md


def test_cli_verifies_100_versions_of_3_sites(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The goal: 100 versions x 3 sites offline in <= 1 s. Timed by the CLI itself and printed
    (no timed assertion: the test machine is shared)."""
    _, pub = generate_aggregator_key(tmp_path)
    key = load_private_key(tmp_path / "aggregator.hybrid")
    ChainFile(tmp_path / "audit-chain.log").append(make_chain(key, 100))
    assert main(["audit", "verify", "--state-dir", str(tmp_path), "--aggregator-key", str(pub)]) == 0
    out = capsys.readouterr().out
    assert "OK, versions 1..100" in out and "hospital_3:100" in out
    print([line for line in out.splitlines() if line.startswith("verified in")])
    # a tampered byte anywhere in the file is refused, with the version named
    data = bytearray((tmp_path / "audit-chain.log").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "audit-chain.log").write_bytes(bytes(data))
    assert main(["audit", "verify", "--chain", str(tmp_path / "audit-chain.log"), "--aggregator-key", str(pub)]) == 2
    assert "version" in capsys.readouterr().err
