"""TLS with mandatory client certificates on a private node, and provisioning through the
management HTTP API of the same node, which also runs the pilot's broker config
(deploy/rabbitmq/rabbitmq.pilot.conf, its TLS section switched on): one extra node start for
the three."""

from __future__ import annotations

import os
import pwd
import shutil
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions
import pytest

from fedmq.broker import provision, tls, topology
from fedmq.broker.local_node import LocalRabbitNode, find_rabbitmq_install, free_port
from tests.conftest import broker_unavailable

pytestmark = [pytest.mark.security, pytest.mark.broker]
ROOT = Path(__file__).resolve().parents[2]
PILOT_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.pilot.conf"


def _pilot_lines() -> list[str]:
    """The pilot config's settings; its listener (5672) and log lines give way to the private
    node's own, and its TLS section, commented out there, is the fixture's TLS config."""
    return [ln for ln in PILOT_CONF.read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#") and not ln.startswith("listeners.")
            and not ln.startswith("log.")]


@dataclass
class TlsNode:
    node: LocalRabbitNode
    files: tls.TlsFiles
    tls_port: int
    management_url: str


def _hand_to_broker_user(directory: Path) -> None:
    """The node runs as ``rabbitmq`` when we are root: it must read the server cert and key."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam("rabbitmq")
    os.chown(directory, entry.pw_uid, entry.pw_gid)
    for path in directory.iterdir():
        os.chown(path, entry.pw_uid, entry.pw_gid)


@pytest.fixture(scope="module")
def tls_node() -> Iterator[TlsNode]:
    if find_rabbitmq_install() is None:
        broker_unavailable("rabbitmq-server is not installed; the TLS test needs a private node")
    pki_dir = Path(tempfile.mkdtemp(prefix="fedmq-tls-"))
    pki_dir.chmod(0o755)
    try:
        files = tls.make_dev_pki(pki_dir, server_names=("localhost", "127.0.0.1"), days=1)
        _hand_to_broker_user(pki_dir)
        tls_port = free_port()
        mgmt_port = free_port()
        node = LocalRabbitNode(
            management_port=mgmt_port,
            extra_config=[*_pilot_lines(), *tls.rabbitmq_tls_config(files.ca_cert, files.server_cert, files.server_key,
                                                                     port=tls_port, host="127.0.0.1")],
        )
        with node:
            yield TlsNode(node, files, tls_port, f"http://127.0.0.1:{mgmt_port}")
    finally:
        shutil.rmtree(pki_dir, ignore_errors=True)


def _tls_params(t: TlsNode, ssl_options: pika.SSLOptions) -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        host="127.0.0.1",
        port=t.tls_port,
        credentials=pika.PlainCredentials(t.node.username, t.node.password),
        ssl_options=ssl_options,
        connection_attempts=1,
        socket_timeout=10,
    )


def test_tls_with_client_certificate_works(tls_node: TlsNode) -> None:
    f = tls_node.files
    conn = pika.BlockingConnection(_tls_params(tls_node, tls.pika_ssl_options(f.ca_cert, f.client_cert, f.client_key, server_name="localhost")))
    try:
        ch = conn.channel()
        ch.exchange_declare(topology.GLOBAL_EXCHANGE, "fanout", durable=True)
        assert conn.is_open
    finally:
        conn.close()


def test_tls_via_amqps_url_and_settings(tls_node: TlsNode) -> None:
    """``amqps://`` URL + FEDMQ_TLS_* style settings (TlsSettingsMixin) -> a working connection."""
    f = tls_node.files

    class Settings(tls.TlsSettingsMixin):
        pass

    settings = Settings(tls_ca=f.ca_cert, tls_cert=f.client_cert, tls_key=f.client_key, tls_server_name="localhost")
    url = f"amqps://{tls_node.node.username}:{tls_node.node.password}@127.0.0.1:{tls_node.tls_port}/%2F"
    conn = pika.BlockingConnection(tls.connection_parameters(url, settings))
    conn.close()


def test_tls_without_client_certificate_is_refused(tls_node: TlsNode) -> None:
    options = tls.pika_ssl_options(tls_node.files.ca_cert, server_name="localhost")
    with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError, ConnectionError)):
        conn = pika.BlockingConnection(_tls_params(tls_node, options))
        conn.close()


def test_tls_with_a_certificate_from_another_ca_is_refused(tls_node: TlsNode, tmp_path: Path) -> None:
    rogue = tls.make_dev_pki(tmp_path / "rogue")
    # trusts the real broker, but presents a client certificate the broker's CA never signed
    options = tls.pika_ssl_options(tls_node.files.ca_cert, rogue.client_cert, rogue.client_key, server_name="localhost")
    with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError, ConnectionError)):
        conn = pika.BlockingConnection(_tls_params(tls_node, options))
        conn.close()


def test_client_refuses_a_broker_it_does_not_trust(tls_node: TlsNode, tmp_path: Path) -> None:
    rogue = tls.make_dev_pki(tmp_path / "rogue")
    f = tls_node.files
    options = tls.pika_ssl_options(rogue.ca_cert, f.client_cert, f.client_key, server_name="localhost")
    with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError, ConnectionError)):
        conn = pika.BlockingConnection(_tls_params(tls_node, options))
        conn.close()


def test_provision_through_the_management_http_api(tls_node: TlsNode) -> None:
    vhost = "fedmq-http"
    site = "hospital_http"
    grants = provision.plan([site], lambda user: provision.generate_password())
    admin = (tls_node.node.username, tls_node.node.password)
    provision.apply_with_http(tls_node.management_url, admin, vhost, grants)
    actual = provision.list_permissions_http(tls_node.management_url, admin, vhost)
    assert actual[site] == provision.site_permissions(site)
    assert actual[provision.AGGREGATOR_USER] == provision.aggregator_permissions()
    # the users log in with their passwords, and the limits hold
    by_user = {g.user: g for g in grants}
    url = provision.amqp_url(site, by_user[site].password, vhost, "127.0.0.1", tls_node.node.amqp_port)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            conn.channel().queue_declare(topology.updates_queue(0), durable=True)
        assert info.value.reply_code == 403
    finally:
        if conn.is_open:
            conn.close()


def test_provision_cli_never_creates_the_vhost_as_guest(tls_node: TlsNode, tmp_path: Path) -> None:
    """``fedmq broker provision --management-url`` (issue 15): whoever creates a vhost through the
    API gets full rights on it, so the creator must be an administrator that is neither guest
    nor a site. The CLI refuses guest and a missing password; afterwards the vhost grants only
    the administrator and fedmq's own users, and guest cannot log in."""
    from fedmq.shared.cli import main

    vhost, site = "fedmq-http-cli", "hospital_cli"
    secret = tmp_path / "admin.password"
    secret.write_text(tls_node.node.password + "\n")
    common = ["broker", "provision", "--management-url", tls_node.management_url, "--vhost", vhost,
              "--sites", site, "--password-dir", str(tmp_path / "passwords")]
    assert main([*common, "--admin-user", "guest", "--admin-password-file", str(secret)]) == 2
    assert main([*common, "--admin-user", site, "--admin-password-file", str(secret)]) == 2
    assert main([*common, "--admin-user", tls_node.node.username]) == 2  # no password file
    assert main([*common, "--admin-user", tls_node.node.username, "--admin-password-file", str(secret)]) == 0
    admin = (tls_node.node.username, tls_node.node.password)
    actual = provision.list_permissions_http(tls_node.management_url, admin, vhost)
    assert set(actual) == {tls_node.node.username, provision.AGGREGATOR_USER, site}
    assert actual[site] == provision.site_permissions(site)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(provision.amqp_url("guest", "guest", vhost, "127.0.0.1", tls_node.node.amqp_port)))


def test_pilot_rabbitmq_conf_is_accepted_by_rabbitmq(tls_node: TlsNode) -> None:
    """deploy/rabbitmq/rabbitmq.pilot.conf (the distribution broker's config in the pilot docs)
    loads into a real node (this module's, TLS on as the pilot's TLS section describes); only
    its listener and log lines are replaced by the private node's own."""
    lines = _pilot_lines()
    assert any(ln.startswith("max_message_size") for ln in lines)
    assert "134217728" in tls_node.node.rabbitmqctl("eval", "application:get_env(rabbit, max_message_size).")
