"""Every config file the project ships runs one round with the real services on a real broker.

deploy/config/aggregator.toml with hospital_1..3.toml (compose's services, each given its
FEDMQ_AMQP_URL as compose's env files do), and deploy/config/site.example.toml (the systemd
example) beside the same aggregator. Only what names this machine's files is rewritten (key,
data and state paths) and the metrics port (9100 may be taken); every other setting is exactly
as shipped. The key material comes from README's commands (``fedmq keys init``, ``fedmq keys
site``) and the broker users from the definitions file compose loads (``fedmq broker
definitions``, one rabbitmqctl call; ``fedmq broker provision``'s rabbitmqctl path is tested in
tests/security), so sites connect as their own least-privilege user and the aggregator checks
user_id.

"One round": the aggregator commits version 1 and every site applies it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pika
import pytest

from fedmq.broker import definitions, provision
from integration.site_kit import write_pngs
from fedmq.shared.cli import main
from testkit.zygote import Zygote

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "config"
PATH_KEYS = ("public_context", "site_keys_dir", "state_dir", "secret_context", "signing_key", "aggregator_public_key",
             "manifest")


def _toml(values: dict) -> str:
    return "".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}\n" for k, v in values.items())


class Deployment:
    def __init__(self, root: Path, broker, namespace) -> None:  # noqa: ANN001
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        keys, sites_dir = root / "keys", root / "keys" / "sites"
        assert main(["keys", "init", "--out", str(keys)]) == 0
        self.sites = ("hospital_1", "hospital_2", "hospital_3")
        for s in self.sites:
            assert main(["keys", "site", "--site-id", s, "--out", str(sites_dir)]) == 0
        assert main(["keys", "aggregator", "--out", str(keys / "aggregator")]) == 0
        self.files = {
            "public_context": next(keys.rglob("aggregator-public.ckks")),
            "secret_context": next(keys.rglob("site-secret.ckks")),
            "site_keys_dir": next(keys.rglob("hospital_1.hybrid.pub")).parent,
            "aggregator_public_key": next(keys.rglob("aggregator.hybrid.pub")),
        }
        passwords: dict[str, str] = {}
        grants = provision.plan(list(self.sites), lambda u: passwords.setdefault(u, provision.generate_password()))
        self.users = [g.user for g in grants]
        # as compose provisions them: one definitions file (``fedmq broker definitions``), one
        # rabbitmqctl call (the file must be readable by the node's own user)
        defs_dir = Path(tempfile.mkdtemp(prefix="fedmq-defs-"))
        try:
            defs_dir.chmod(0o755)
            path = definitions.write_definitions(defs_dir / "definitions.json",
                                                 definitions.definitions(namespace.vhost, grants, sites=list(self.sites)))
            broker.rabbitmqctl("import_definitions", str(path))
        finally:
            shutil.rmtree(defs_dir, ignore_errors=True)
        params = pika.URLParameters(namespace.url)
        self.urls = {g.user: provision.amqp_url(g.user, g.password, namespace.vhost, params.host, params.port)
                     for g in grants}
        conn = pika.BlockingConnection(params)
        try:
            provision.declare_topology(conn.channel(), list(self.sites))
        finally:
            conn.close()

    def config(self, name: str, site: str | None = None, **extra) -> Path:  # noqa: ANN003
        shipped = tomllib.loads((CONFIG / name).read_text())
        values = dict(shipped)
        for key in PATH_KEYS:
            if key not in values:
                continue
            if key == "state_dir":
                values[key] = str(self.root / "state" / (site or "aggregator"))
            elif key == "signing_key":
                values[key] = str(next(self.root.joinpath("keys").rglob(f"{site or 'aggregator'}.hybrid")))
            elif key == "manifest":
                size = int(shipped.get("image_size", 28))
                values[key] = str(write_pngs(self.root / "data" / site, {"train": 16, "val": 8}, size=size + 8))
            else:
                values[key] = str(self.files[key])
        values.update(extra)
        out = self.root / "config" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_toml(values))
        return out

    def start(self, name: str, argv: list[str], user: str, *, zygote: Zygote | None = None, **env: str) -> None:
        """``python -m fedmq.shared.cli ARGV`` as its own process: a fresh interpreter, or one
        forked from ``zygote`` (the same command line, environment and working directory, the
        same ``main``, without the interpreter start and the torch imports)."""
        full_env = dict(os.environ, PYTHONPATH=str(ROOT), FEDMQ_AMQP_URL=self.urls[user], **env)
        argv = [sys.executable, "-m", "fedmq.shared.cli", *argv]
        with (self.root / f"{name}.log").open("wb") as log:
            if zygote is not None:
                self.procs[name] = zygote.spawn(argv, full_env, log, cwd=self.root)
            else:
                self.procs[name] = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def wait(self, pred, timeout: float, what: str) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                pytest.fail(f"{dead} exited while waiting for {what}:\n" +
                            "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in dead))
            if pred():
                return
            time.sleep(0.5)
        pytest.fail(f"timed out waiting for {what}:\n" + "\n".join(f"--- {n}\n{self.log(n)[-2000:]}" for n in self.procs))

    def version(self, who: str) -> int:
        path = self.root / "state" / who / ("status.json" if who == "aggregator" else "state.json")
        try:
            return int(json.loads(path.read_text())["version"])
        except (OSError, ValueError, KeyError):
            return 0

    def stop(self) -> dict[str, int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for n, p in self.procs.items():
            try:
                codes[n] = p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[n] = None
        return codes


@pytest.fixture
def deployment(broker_ctl, broker_namespace, tmp_path):  # noqa: ANN001
    dep = Deployment(tmp_path, broker_ctl, broker_namespace)
    try:
        yield dep
    finally:
        dep.stop()
        broker_ctl.retire_users(dep.users)


def test_compose_configs_run_one_round(deployment, zygote):
    """aggregator.toml + hospital_1..3.toml, as compose runs them. The three sites are forked
    from the zygote (each still its own process with its own environment and signals): a fresh
    interpreter's start is proved by the aggregator here and by both services of the systemd
    test below, and three more torch imports proved nothing about the configs."""
    dep = deployment
    agg = dep.config("aggregator.toml")
    dep.start("aggregator", ["aggregator", "run", "--config", str(agg)], provision.AGGREGATOR_USER,
              FEDMQ_METRICS_PORT="0")
    for s in dep.sites:
        cfg = dep.config(f"{s}.toml", s)
        assert main(["site", "check-data", "--config", str(cfg), "--out", str(dep.root / "check" / s)]) == 0
        dep.start(s, ["site", "run", "--config", str(cfg)], s, zygote=zygote)
    dep.wait(lambda: all(dep.version(s) >= 1 for s in dep.sites), 300, "version 1 at every site")
    codes = dep.stop()
    assert set(codes.values()) == {0}, codes
    assert "Traceback" not in "".join(dep.log(n) for n in dep.procs)
    # README's last two commands on what the round left behind
    assert main(["status", "--state-dir", str(dep.root / "state" / "aggregator")]) == 0
    assert main(["site", "export-model", "--config", str(dep.root / "config" / "hospital_1.toml"),
                 "--out", str(dep.root / "model")]) == 0
    assert any((dep.root / "model").iterdir())


def test_systemd_examples_run_one_round(deployment):
    """aggregator.example.toml (K = 1 here: one site only) with site.example.toml (resnet18_224
    under DP), as the systemd units run them: each in a fresh interpreter."""
    dep = deployment
    agg = dep.config("aggregator.example.toml", buffer_size=1)
    dep.start("aggregator", ["aggregator", "run", "--config", str(agg)], provision.AGGREGATOR_USER,
              FEDMQ_METRICS_PORT="0")
    name = "site.example.toml"
    site = tomllib.loads((CONFIG / name).read_text())["site_id"]
    dep.start(site, ["site", "run", "--config", str(dep.config(name, site))], site)
    dep.wait(lambda: dep.version(site) >= 1, 600, f"version 1 at {name}")
    codes = dep.stop()
    assert set(codes.values()) == {0}, codes
