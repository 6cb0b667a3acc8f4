"""``fedmq broker``: users and permissions, topology, definitions, TLS material, a local node."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from fedmq.shared.errors import FedmqError


class BrokerCliError(FedmqError):
    """A ``fedmq broker`` command failed in a way the operator can fix."""


def _sites(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _add_common(p: argparse.ArgumentParser, *, password_dir_required: bool = True) -> None:
    p.add_argument("--vhost", default="fedmq", help="virtual host (default: fedmq)")
    p.add_argument("--sites", type=_sites, default=[], help="comma-separated site ids, e.g. hospital_1,hospital_2")
    p.add_argument("--shards", type=int, default=1, help="number of updates-queue shards (default 1)")
    p.add_argument(
        "--password-dir",
        required=password_dir_required,
        help="directory of <user>.password files (mode 0600); missing ones are generated",
    )
    p.add_argument("--amqp-host", default="127.0.0.1", help="host name put in the printed AMQP URLs")
    p.add_argument("--amqp-port", type=int, default=None, help="port in the printed URLs (5672, or 5671 with --tls)")
    p.add_argument("--tls", action="store_true", help="print amqps:// URLs")


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    prov = sub.add_parser("provision", help="create the vhost and least-privilege users on a running broker")
    _add_common(prov)
    prov.add_argument("--management-url", help="use the management HTTP API at this URL instead of rabbitmqctl")
    prov.add_argument(
        "--admin-user",
        default=None,
        help="management API administrator (with --management-url; default fedmq-admin); never guest, never a site",
    )
    prov.add_argument(
        "--admin-password-file", help="file holding the administrator's password (required with --management-url)"
    )
    prov.add_argument("--cacert", help="CA file for an https:// management URL")
    prov.add_argument("--node", help="rabbitmqctl -n NODE (default: rabbitmqctl's own default node)")
    prov.add_argument("--rabbitmqctl", default="rabbitmqctl", help="path of rabbitmqctl")
    prov.set_defaults(handler=_provision)

    dec = sub.add_parser("declare", help="declare all exchanges, the aggregator's queues and the sites' queues (as admin)")
    dec.add_argument("--url", required=True, help="AMQP URL of an administrator of the vhost")
    dec.add_argument("--sites", type=_sites, default=[], help="comma-separated site ids whose queues to pre-declare")
    dec.add_argument("--shards", type=int, default=1)
    dec.set_defaults(handler=_declare)

    defs = sub.add_parser("definitions", help="write a RabbitMQ definitions JSON (users, permissions, topology)")
    defs.add_argument("--out", required=True, help="definitions file to write")
    _add_common(defs)
    defs.add_argument("--env-dir", help="also write <user>.env files holding FEDMQ_AMQP_URL for compose (mode 0600)")
    defs.add_argument("--no-admin", action="store_true", help="leave out the fedmq-admin administrator user")
    defs.set_defaults(handler=_definitions)

    tls = sub.add_parser("tls", help="make a throw-away CA, a server and a client certificate (development only)")
    tls.add_argument("--out", required=True)
    tls.add_argument("--server-name", action="append", help="SAN of the server certificate (repeatable; default localhost, 127.0.0.1)")
    tls.add_argument("--days", type=int, default=30)
    tls.set_defaults(handler=_tls)

    local = sub.add_parser("local", help="run a private RabbitMQ node in the foreground (developers)")
    local.add_argument("--management-port", type=int, help="also enable the management UI on this port")
    local.add_argument("--data-dir", help="keep the node's data here (default: a temporary directory, removed on exit)")
    local.add_argument("--provision", action="store_true", help="also create the fedmq vhost, users and topology")
    local.add_argument("--port", dest="amqp_port", type=int,
                       help="AMQP port of the node (default: a free one); the printed URLs use it")
    local.add_argument("--node-name", help="Erlang node name, e.g. fedmq@localhost (keep it with --data-dir)")
    _add_common(local, password_dir_required=False)
    local.set_defaults(handler=_local)


def _port(args: argparse.Namespace) -> int:
    return args.amqp_port if args.amqp_port is not None else (5671 if args.tls else 5672)


def _grants(args: argparse.Namespace, *, include_admin: bool):  # noqa: ANN202
    from fedmq.broker import provision

    if args.shards < 1:
        raise BrokerCliError("--shards must be at least 1")
    try:
        return provision.plan(
            args.sites,
            lambda user: provision.load_or_create_password(args.password_dir, user),
            shards=args.shards,
            include_admin=include_admin,
        )
    except provision.ProvisionError as exc:
        raise BrokerCliError(str(exc)) from None


def _print_urls(args: argparse.Namespace, grants) -> None:  # noqa: ANN001
    from fedmq.broker import provision

    for g in grants:
        url = provision.amqp_url(g.user, g.password, args.vhost, args.amqp_host, _port(args), tls=args.tls)
        print(f"{g.role:<10} {g.user:<20} {url}")


def _ctl_runner(binary: str, node: str | None):  # noqa: ANN202
    exe = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/local/sbin")
    if exe is None:
        raise BrokerCliError(f"{binary} not found; use --management-url or --rabbitmqctl PATH")

    def run(*args: str) -> str:
        argv = [exe, *(["-n", node] if node else []), "-q", *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)  # noqa: S603
        if result.returncode != 0:
            raise BrokerCliError(f"rabbitmqctl {args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    return run


def _provision(args: argparse.Namespace) -> int:
    from fedmq.broker import provision

    grants = _grants(args, include_admin=False)
    try:
        if args.management_url:
            admin = _admin_credentials(args, grants)
            provision.apply_with_http(args.management_url, admin, args.vhost, grants, cafile=args.cacert)
        else:
            provision.apply_with_rabbitmqctl(_ctl_runner(args.rabbitmqctl, args.node), args.vhost, grants)
    except provision.ProvisionError as exc:
        raise BrokerCliError(str(exc)) from None
    print(f"provisioned vhost {args.vhost!r}: {len(grants)} users; passwords in {args.password_dir}")
    _print_urls(args, grants)
    return 0


def _admin_credentials(args: argparse.Namespace, grants) -> tuple[str, str]:  # noqa: ANN001
    """The management API administrator: never guest, never one of the users being provisioned.

    RabbitMQ grants whoever creates a vhost through the API full rights on it, so the creator
    must be an administrator that no site or service logs in as.
    """
    from fedmq.broker import provision

    user = args.admin_user or provision.ADMIN_USER
    if user == "guest":
        raise BrokerCliError("refusing to provision as guest: create an administrator (docs/deployment.md) and pass --admin-user")
    if user in {g.user for g in grants}:
        raise BrokerCliError(f"--admin-user {user!r} is a fedmq site or service user; use a separate administrator")
    if not args.admin_password_file:
        raise BrokerCliError("--management-url needs --admin-password-file (the administrator's password)")
    try:
        password = Path(args.admin_password_file).read_text().strip()
    except OSError as exc:
        raise BrokerCliError(f"cannot read {args.admin_password_file}: {exc.strerror}") from None
    if not password:
        raise BrokerCliError(f"{args.admin_password_file} is empty")
    return user, password


def _declare(args: argparse.Namespace) -> int:
    import pika
    import pika.exceptions

    from fedmq.broker import provision

    try:
        conn = pika.BlockingConnection(pika.URLParameters(args.url))
    except pika.exceptions.AMQPError as exc:
        raise BrokerCliError(f"cannot connect: {exc!r}") from None
    try:
        provision.declare_topology(conn.channel(), args.sites, args.shards)
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise BrokerCliError(f"broker refused a declaration: {exc.reply_code} {exc.reply_text}") from None
    finally:
        if conn.is_open:
            conn.close()
    print(f"declared {len(provision.all_queue_specs(args.sites, args.shards))} queues and all exchanges")
    return 0


def _definitions(args: argparse.Namespace) -> int:
    from fedmq.broker import definitions, provision

    grants = _grants(args, include_admin=not args.no_admin)
    doc = definitions.definitions(args.vhost, grants, sites=args.sites, shards=args.shards)
    path = definitions.write_definitions(args.out, doc)
    print(f"wrote {path}: {len(doc['users'])} users, {len(doc['queues'])} queues, {len(doc['bindings'])} bindings")
    # a definitions file cannot carry node settings: the rabbitmq.conf that loads it must
    print("the broker's rabbitmq.conf must also hold (deploy/rabbitmq/rabbitmq.conf does): " + "; ".join(_conf_limits()))
    if args.env_dir:
        env_dir = Path(args.env_dir)
        env_dir.mkdir(parents=True, exist_ok=True)
        for g in grants:
            url = provision.amqp_url(g.user, g.password, args.vhost, args.amqp_host, _port(args), tls=args.tls)
            target = env_dir / f"{g.user}.env"
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(f"# generated by fedmq broker definitions; secret\nFEDMQ_AMQP_URL={url}\n")
            print(f"wrote {target}")
    return 0


def _conf_limits() -> list[str]:
    from fedmq.broker.topology import rabbitmq_conf_limits

    return rabbitmq_conf_limits()


def _tls(args: argparse.Namespace) -> int:
    from fedmq.broker import tls

    names = tuple(args.server_name or tls.DEFAULT_SERVER_NAMES)
    files = tls.make_dev_pki(args.out, server_names=names, days=args.days)
    for f in (files.ca_cert, files.server_cert, files.server_key, files.client_cert, files.client_key):
        print(f)
    print("rabbitmq.conf:")
    for line in tls.rabbitmq_tls_config(files.ca_cert, files.server_cert, files.server_key):
        print(f"  {line}")
    return 0


def _local(args: argparse.Namespace) -> int:
    from fedmq.broker import provision
    from fedmq.broker.local_node import LocalNodeError, LocalRabbitNode

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        node = LocalRabbitNode(management_port=args.management_port, data_dir=args.data_dir,
                               amqp_port=args.amqp_port, node_name=args.node_name)
    except LocalNodeError as exc:
        raise BrokerCliError(str(exc)) from None
    try:
        seconds = node.start()
        print(f"private RabbitMQ node {node.node_name} ready in {seconds:.1f}s")
        print(f"admin URL: {node.amqp_url}")
        print(f"AMQP port: {node.amqp_port}; Erlang cookie: {node.ctl_environment()['HOME']}/.erlang.cookie; "
              f"epmd port: {node.epmd_port}")
        print(f"rabbitmqctl: {node.ctl_command_line()}")
        if args.management_port:
            print(f"management UI: http://{node.host}:{args.management_port}/ (user {node.username}, password in the admin URL)")
        if args.provision:
            import pika

            password_dir = args.password_dir or str(Path(node.data_dir).parent / "passwords")
            args.password_dir = password_dir
            grants = _grants(args, include_admin=False)
            provision.apply_with_rabbitmqctl(node.rabbitmqctl, args.vhost, grants)
            node.rabbitmqctl("set_permissions", "-p", args.vhost, node.username, ".*", ".*", ".*")
            conn = pika.BlockingConnection(pika.URLParameters(node.url_for_vhost(args.vhost)))
            try:
                provision.declare_topology(conn.channel(), args.sites, args.shards)
            finally:
                conn.close()
            args.amqp_host, args.amqp_port = node.host, node.amqp_port
            _print_urls(args, grants)
        print("press Ctrl-C to stop", flush=True)
        while not stop.wait(1.0):
            if not node.running:
                print("the node exited", file=sys.stderr)
                return 1
    finally:
        print("stopping the node ...", flush=True)
        node.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
