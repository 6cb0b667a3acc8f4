"""TLS for the broker: a throw-away CA, server and client certificates, the ``rabbitmq.conf``
lines for an ``amqps`` listener that demands client certificates, and pika ``SSLOptions``.

The CA made here is for development, tests and the single-host compose demo. A hospital network
uses its own PKI; only :func:`rabbitmq_tls_config` and :func:`pika_ssl_options` matter then.

Settings: :class:`TlsSettingsMixin` adds ``tls_ca`` / ``tls_cert`` / ``tls_key`` /
``tls_server_name`` (env ``FEDMQ_TLS_CA`` ...) to a settings class that mixes it in; with an
``amqps://`` URL, :func:`connection_parameters` applies them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pika
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmq"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, mode: int) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.chmod(path, mode)


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_name: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    days: int,
    ca: bool = False,
    san: Sequence[str] = (),
    usage: Sequence[x509.ObjectIdentifier] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
    if san:
        builder = builder.add_extension(_san(san), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_dev_pki(
    out_dir: str | os.PathLike[str],
    *,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    client_name: str = "fedmq-client",
    days: int = 30,
    key_mode: int = 0o600,
) -> TlsFiles:
    """Write ``ca.pem``, ``server.pem``/``server.key`` and ``client.pem``/``client.key`` (ECDSA P-256).

    ``key_mode`` is the keys' file mode; when the broker runs as another user (the ``rabbitmq``
    user of a private test node, the container's uid 999) the caller makes ``server.key``
    readable by it (chown, or a looser mode for throw-away test material).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fedmq development CA")
    ca_cert = _issue("fedmq development CA", ca_key, ca_name, ca_key, days=days, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(server_names[0], server_key, ca_name, ca_key, days=days, san=server_names, usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _issue(client_name, client_key, ca_name, ca_key, days=days, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    files = TlsFiles(out / "ca.pem", out / "server.pem", out / "server.key", out / "client.pem", out / "client.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(files.server_key, server_key, key_mode)
    _write_key(files.client_key, client_key, key_mode)
    return files


def rabbitmq_tls_config(
    ca_cert: str | os.PathLike[str],
    server_cert: str | os.PathLike[str],
    server_key: str | os.PathLike[str],
    *,
    port: int = 5671,
    host: str | None = None,
    disable_plain_listener: bool = False,
    versions: Sequence[str] = ("tlsv1.3", "tlsv1.2"),
) -> list[str]:
    """``rabbitmq.conf`` lines for an ``amqps`` listener that requires a CA-signed client cert."""
    listener = f"{host}:{port}" if host else str(port)
    lines = [
        f"listeners.ssl.default = {listener}",
        f"ssl_options.cacertfile = {ca_cert}",
        f"ssl_options.certfile = {server_cert}",
        f"ssl_options.keyfile = {server_key}",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = true",
        "ssl_options.honor_cipher_order = true",
    ]
    lines += [f"ssl_options.versions.{i + 1} = {v}" for i, v in enumerate(versions)]
    if disable_plain_listener:
        lines.append("listeners.tcp = none")
    return lines


def ssl_context(
    ca_cert: str | os.PathLike[str],
    client_cert: str | os.PathLike[str] | None = None,
    client_key: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """Client context: verifies the broker against ``ca_cert``; presents a client cert if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:
        context.load_cert_chain(str(client_cert), str(client_key) if client_key is not None else None)
    return context


def pika_ssl_options(
    ca_cert: str | os.PathLike[str],
    client_cert: str | os.PathLike[str] | None = None,
    client_key: str | os.PathLike[str] | None = None,
    *,
    server_name: str = "localhost",
) -> pika.SSLOptions:
    """pika ``SSLOptions`` (hostname checked against ``server_name``)."""
    return pika.SSLOptions(ssl_context(ca_cert, client_cert, client_key), server_hostname=server_name)


class TlsSettingsMixin(BaseModel):
    """Optional TLS fields for a ``FedmqSettings`` subclass (env ``FEDMQ_TLS_CA`` and so on).

    Mix it in *before* the settings base: ``class S(TlsSettingsMixin, SiteSettings)``.
    """

    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: name checked against the broker certificate; the URL's host when None
    tls_server_name: str | None = None


def connection_parameters(url: str, settings: object | None = None) -> pika.URLParameters:
    """``pika.URLParameters(url)``, with ``SSLOptions`` from ``settings.tls_*`` for ``amqps://`` URLs."""
    params = pika.URLParameters(url)
    if url.startswith("amqps://") and settings is not None and getattr(settings, "tls_ca", None):
        params.ssl_options = pika_ssl_options(
            settings.tls_ca,  # type: ignore[attr-defined]
            getattr(settings, "tls_cert", None),
            getattr(settings, "tls_key", None),
            server_name=getattr(settings, "tls_server_name", None) or params.host,
        )
    return params


__all__ = [
    "TlsFiles",
    "TlsSettingsMixin",
    "connection_parameters",
    "make_dev_pki",
    "pika_ssl_options",
    "rabbitmq_tls_config",
    "ssl_context",
]
