"""Failure paths of the services' plumbing: disk errors in the WAL, odd headers, TLS parameters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedmq.aggregator.publisher import amqp_safe
from fedmq.aggregator.wal import WriteAheadLog, read_records
from fedmq.broker.connection import parameters, split_urls
from fedmq.broker.tls import make_dev_pki
from fedmq.shared.settings import FedmqSettings


def test_failed_wal_append_is_cut_off_so_later_records_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal = WriteAheadLog(tmp_path / "wal.log")
    wal.append({"n": 1})
    size = (tmp_path / "wal.log").stat().st_size
    real_fsync = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        wal.append({"n": 2, "payload": b"x" * 10_000})
    assert (tmp_path / "wal.log").stat().st_size == size
    wal.append({"n": 3})
    wal.close()
    records, _, torn = read_records(tmp_path / "wal.log")
    assert [r["n"] for r in records] == [1, 3]
    assert not torn


def test_dead_letter_headers_are_made_encodable() -> None:
    import pika.data

    headers = amqp_safe({"f": 3.5, "nested": {"g": [1.5, "x", None]}, "ok": 7, "b": b"\x00"})
    assert headers == {"f": "3.5", "nested": {"g": ["1.5", "x", None]}, "ok": 7, "b": b"\x00"}
    pika.data.encode_table([], headers)  # raises for anything pika cannot put on the wire


def test_amqps_url_gets_client_certificate_from_settings(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path)
    settings = FedmqSettings(tls_ca=pki.ca_cert, tls_cert=pki.client_cert, tls_key=pki.client_key)
    params = parameters("amqps://site:pw@localhost:5671/fedmq", tls=settings)
    assert params.ssl_options is not None
    assert params.ssl_options.server_hostname == "localhost"
    plain = parameters("amqp://site:pw@localhost:5672/fedmq", tls=settings)
    assert plain.ssl_options is None


def test_cluster_urls_are_split() -> None:
    assert split_urls("amqp://a:1/v, amqp://b:2/v amqp://c:3/v") == ["amqp://a:1/v", "amqp://b:2/v", "amqp://c:3/v"]
