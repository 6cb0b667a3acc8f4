"""The deployment files are consistent with the code: compose commands are real ``fedmq``
invocations, configs load with the settings classes, mounts cover the paths the configs name,
the systemd unit is hardened, and the generated definitions load into a real broker with the
intended permissions."""

from __future__ import annotations

import configparser
import os
import re
import secrets
import shlex
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import pika
import pika.exceptions
import pytest
import yaml

from fedmq.broker import definitions as defs
from fedmq.broker import provision, topology
from fedmq.shared.cli import build_parser, main
from fedmq.shared.settings import load_settings
from testkit.broker import Namespace

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
SITES = ("hospital_1", "hospital_2", "hospital_3")


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _fedmq_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in _compose()["services"].items() if str(svc.get("image", "")).startswith("fedmq")}


def _invocations(svc: dict[str, Any]) -> list[list[str]]:
    """The fedmq argv lists a service runs: its command, or each ``fedmq ...`` in its sh script."""
    entrypoint = svc.get("entrypoint")
    command = svc.get("command")
    if entrypoint is None:
        assert isinstance(command, list), "use exec form for fedmq commands"
        return [[str(a) for a in command]]
    assert entrypoint[:2] == ["/bin/sh", "-c"], entrypoint
    script = command[0] if isinstance(command, list) else command
    # compose interpolates $VAR; a literal $ must be written $$
    assert not re.search(r"(?<!\$)\$(?!\$)", script.replace("$$", "")), "unescaped $ in a compose script"
    script = script.replace("$$", "$")
    found = []
    for match in re.finditer(r"(?:^|[;&|]\s*|\bthen\s+|\bdo\s+)fedmq\s+([^;&|\n]+)", script, re.M):
        found.append(shlex.split(match.group(1)))
    assert found, "an init script without any fedmq invocation"
    return found


def _parse(argv: list[str]):  # noqa: ANN202
    parser = build_parser()
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on errors
        pytest.fail(f"not a valid fedmq invocation: fedmq {' '.join(argv)} ({exc})")


def _settings_class(group: str):  # noqa: ANN202
    if group == "site":
        from fedmq.site_agent.settings import SiteSettings

        return SiteSettings
    if group == "aggregator":
        from fedmq.aggregator.settings import AggregatorSettings

        return AggregatorSettings
    raise AssertionError(f"no settings class known for group {group!r}")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("FEDMQ_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env


def _mounts(svc: dict[str, Any]) -> dict[str, str]:
    """container path -> source, from short-syntax volumes."""
    out = {}
    for v in svc.get("volumes", []):
        parts = v.split(":")
        out[parts[1]] = parts[0]
    return out


def _covered(path: PurePosixPath, mounts: dict[str, str]) -> bool:
    return any(path == PurePosixPath(m) or PurePosixPath(m) in path.parents for m in mounts)


# ----------------------------------------------------------------------------- compose
def _assert_broker_limits(conf: str) -> None:
    """Every broker config fedmq ships carries the size limit derived from the codec (issue 15)
    and never a guest or a default user of its own."""
    from fedmq.broker.topology import BROKER_MAX_MESSAGE_SIZE, rabbitmq_conf_limits
    from fedmq.shared.codec import DEFAULT_MAX_MESSAGE_BYTES

    assert BROKER_MAX_MESSAGE_SIZE <= 2 * DEFAULT_MAX_MESSAGE_BYTES
    lines = {line.strip() for line in conf.splitlines() if line.strip() and not line.lstrip().startswith("#")}
    assert set(rabbitmq_conf_limits()) <= lines, lines
    assert [line for line in lines if line.startswith("max_message_size")] == [f"max_message_size = {BROKER_MAX_MESSAGE_SIZE}"]
    assert not any(line.startswith(("default_user", "default_pass")) for line in lines)
    assert "loopback_users = none" not in lines and "loopback_users.guest = false" not in lines


def test_private_node_config_has_no_guest_and_the_size_limit(tmp_path: Path) -> None:
    from fedmq.broker.local_node import GUEST_USER, LocalRabbitNode, find_rabbitmq_install
    from fedmq.broker.topology import rabbitmq_conf_limits

    if find_rabbitmq_install() is None:
        pytest.skip("rabbitmq-server not installed")
    node = LocalRabbitNode(data_dir=tmp_path / "data")
    try:
        text = node._config_text()
        assert set(rabbitmq_conf_limits()) <= set(text.splitlines())
        assert f"default_user = {node.username}" in text and node.username != GUEST_USER
        assert len(node.password) >= 24 and GUEST_USER not in text
        # a caller-kept data dir keeps the administrator's password for the next start
        again = LocalRabbitNode(data_dir=tmp_path / "data")
        again.close()
        assert again.password == node.password
    finally:
        node.close()


def test_compose_services_and_broker() -> None:
    doc = _compose()
    services = doc["services"]
    assert {"rabbitmq", "keys", "aggregator", *SITES} <= set(services)
    rabbit = services["rabbitmq"]
    assert rabbit["image"].startswith("rabbitmq:3.13-management")
    assert rabbit["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    mounts = _mounts(rabbit)
    assert mounts["/etc/rabbitmq/definitions.json"] == "./deploy/rabbitmq/definitions.json"
    conf = (ROOT / mounts["/etc/rabbitmq/rabbitmq.conf"]).read_text()
    assert "load_definitions = /etc/rabbitmq/definitions.json" in conf
    _assert_broker_limits(conf)
    for name in ("aggregator", *SITES):
        svc = services[name]
        assert svc["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert svc["depends_on"]["keys"]["condition"] == "service_completed_successfully"
        assert "healthcheck" in svc
    # every named volume used is declared
    declared = set(doc["volumes"])
    for svc in services.values():
        for source in _mounts(svc).values():
            if not source.startswith(("./", "/")):
                assert source in declared, source


@pytest.mark.parametrize("service", sorted(_fedmq_services()))
def test_compose_commands_are_valid_fedmq_invocations(service: str) -> None:
    for argv in _invocations(_fedmq_services()[service]):
        args = _parse(argv)
        assert getattr(args, "handler", None) is not None, argv


@pytest.mark.parametrize("service", ["aggregator", *SITES])
def test_compose_configs_load_and_mounts_cover_their_paths(service: str, clean_env: None) -> None:
    svc = _fedmq_services()[service]
    [argv] = _invocations(svc)
    group = argv[0]
    config = PurePosixPath(argv[argv.index("--config") + 1])
    mounts = _mounts(svc)
    host_dir = mounts[str(config.parent)]
    host_file = ROOT / host_dir / config.name
    settings = load_settings(_settings_class(group), host_file)
    # the env file sets the URL; the broker user in it must be the site id / the aggregator user
    env_files = svc["env_file"]
    expected_user = settings.site_id if group == "site" else provision.AGGREGATOR_USER
    assert env_files == [f"deploy/compose/{expected_user}.env"]
    if group == "site":
        assert settings.site_id == service
    for field, value in settings.model_dump().items():
        if isinstance(value, Path) and value.is_absolute():
            assert _covered(PurePosixPath(value), mounts), f"{service}: {field}={value} is on no mounted volume"
    # the aggregator never mounts the CKKS secret; sites mount only their own signing key
    sources = set(mounts.values())
    if group == "aggregator":
        assert "ckks-secret" not in sources
    else:
        assert not any(s.endswith("-signing") and not s.startswith(service) for s in sources)


def test_example_site_config_for_systemd_loads(clean_env: None) -> None:
    from fedmq.site_agent.settings import SiteSettings

    settings = load_settings(SiteSettings, ROOT / "deploy" / "config" / "site.example.toml")
    assert settings.site_id == "hospital_1"


# ----------------------------------------------------------------------------- systemd, Docker
@pytest.mark.parametrize("unit_file, group", [("fedmq-site.service", "site"), ("fedmq-aggregator.service", "aggregator")])
def test_systemd_unit_is_hardened(unit_file: str, group: str) -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "systemd" / unit_file)
    service = unit["Service"]
    assert service["User"] == "fedmq"
    assert service["ProtectSystem"] == "strict"
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"].startswith("/etc/fedmq/")
    assert service["NoNewPrivileges"] == "yes"
    assert service["ReadWritePaths"].split() == ["/var/lib/fedmq"]
    exec_start = shlex.split(service["ExecStart"])
    assert exec_start[0].endswith("/fedmq")
    args = _parse(exec_start[1:])
    assert args.group == group


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    torch = text.index("download.pytorch.org/whl/cpu")
    assert "torch==2.13.0" in text
    assert torch < text.index("RUN pip install .")
    assert re.search(r"^USER fedmq$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["fedmq"\]$', text, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored and "deploy/compose/*.env" in ignored


# ----------------------------------------------------------------------------- definitions
def test_password_hash_format() -> None:
    h = defs.rabbit_password_hash("s3cret", salt=b"\x90\x8d\xc6\x0a")
    # base64(salt + sha256(salt + password)), as rabbit_password_hashing_sha256 stores it
    import base64
    import hashlib

    raw = base64.b64decode(h)
    assert raw[:4] == b"\x90\x8d\xc6\x0a" and raw[4:] == hashlib.sha256(raw[:4] + b"s3cret").digest()
    assert defs.check_password_hash("s3cret", h) and not defs.check_password_hash("other", h)


@pytest.mark.broker
def test_definitions_load_into_a_real_broker(broker_ctl, tmp_path: Path) -> None:  # noqa: ANN001
    token = secrets.token_hex(3)
    vhost = f"fedmq-defs-{token}"
    sites = [f"defs{token}_1", f"defs{token}_2"]
    # the node's rabbitmqctl runs as the broker's user: the file must be readable by it
    out_dir = Path(tempfile.mkdtemp(prefix="fedmq-defs-"))
    out_dir.chmod(0o755)
    password_dir = tmp_path / "passwords"
    try:
        assert main(["broker", "definitions", "--out", str(out_dir / "definitions.json"), "--vhost", vhost,
                     "--sites", ",".join(sites), "--password-dir", str(password_dir), "--env-dir", str(tmp_path / "env")]) == 0
        for f in password_dir.iterdir():
            assert f.stat().st_mode & 0o777 == 0o600
        broker_ctl.rabbitmqctl("import_definitions", str(out_dir / "definitions.json"))
        actual = provision.parse_list_permissions(broker_ctl.rabbitmqctl("list_permissions", "-p", vhost, "--no-table-headers"))
        assert actual == {
            provision.ADMIN_USER: provision.admin_permissions(),
            provision.AGGREGATOR_USER: provision.aggregator_permissions(),
            **{s: provision.site_permissions(s) for s in sites},
        }
        queues = broker_ctl.rabbitmqctl("list_queues", "-p", vhost, "name", "type", "--no-table-headers")
        for spec in provision.all_queue_specs(sites):
            assert re.search(rf"^{re.escape(spec.name)}\s+quorum$", queues, re.M), queues
        # the hashes work: a site logs in with the URL from its env file and its limits hold
        env_line = (tmp_path / "env" / f"{sites[0]}.env").read_text().split("FEDMQ_AMQP_URL=")[1].strip()
        port = pika.URLParameters(broker_ctl.url).port
        url = env_line.replace("@127.0.0.1:5672/", f"@127.0.0.1:{port}/")
        conn = pika.BlockingConnection(pika.URLParameters(url))
        try:
            ch = conn.channel()
            topology.check_declared(ch, (topology.site_queue_spec(sites[0]),))  # declared by the definitions
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
                ch.basic_consume(topology.updates_queue(0), lambda *a: None)
            assert info.value.reply_code == 403
        finally:
            if conn.is_open:
                conn.close()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        broker_ctl.retire_namespace(Namespace(url=broker_ctl.url, vhost=vhost, prefix="", isolation="vhost"))
        broker_ctl.retire_users([*sites, provision.ADMIN_USER, provision.AGGREGATOR_USER])


def test_definitions_name_no_guest_and_cap_the_dead_letter_queue() -> None:
    """The generated definitions (compose, the demo) grant nothing to guest, and carry the
    dead-letter queue's caps (issue 15)."""
    from fedmq.broker import definitions as defs
    from fedmq.broker import provision, topology

    grants = provision.plan(list(SITES), lambda user: "pw", include_admin=True)
    doc = defs.definitions("fedmq", grants, sites=list(SITES))
    assert "guest" not in {u["name"] for u in doc["users"]} | {p["user"] for p in doc["permissions"]}
    dlq = next(q for q in doc["queues"] if q["name"] == topology.DEAD_LETTER_QUEUE)
    assert dlq["arguments"]["x-max-length"] == topology.DEAD_LETTER_MAX_LENGTH
    assert dlq["arguments"]["x-max-length-bytes"] == topology.DEAD_LETTER_MAX_BYTES
    assert dlq["arguments"]["x-overflow"] == "drop-head"
