"""The fault driver's federation and its administrator's view of the broker.

:class:`FaultFederation` is the product's ``Federation`` with the site processes started through
``tests/launcher.py`` (``python -m tests.launcher``), the one place test hooks are injected:
every site records the plaintext of the updates it builds, and a chosen site can be killed
between the chunks of an update. Hooks are never switched on by environment variables, so the
fault driver needs a fedmq checkout (the launcher is not installed); the class says so when the
launcher is missing.

The administrator's side (an observer queue on the global fanout, draining it and the
dead-letter queue) goes through ``broker.transport`` like everything else.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmq.broker import topology
from fedmq.broker.transport import AmqpLink, connect_link
from fedmq.experiments.faults.plan import FaultCheckFailed
from fedmq.experiments.federation import VHOST, Federation, FederationSpec, Spawner
from fedmq.shared.errors import ConfigError

OBSERVER_QUEUE = "fedmq.faults.observer"
#: the test launcher that injects the site hooks (plaintext recording, a kill mid-publish)
LAUNCHER_MODULE = "tests.launcher"
REPO_ROOT = Path(__file__).resolve().parents[2]


class FaultFederation(Federation):
    """A Federation whose site processes run with test hooks injected by ``tests/launcher.py``:
    every site records its plaintext updates; ``extra_hooks[site]`` adds launcher options for
    that site's next start (a kill mid-publish)."""

    def __init__(self, spec: FederationSpec, progress: Callable[[str], None] | None = None, *,
                 spawner: Spawner | None = None) -> None:
        super().__init__(spec, progress, spawner=spawner)
        self.extra_hooks: dict[str, list[str]] = {}
        if not (REPO_ROOT / "tests" / "launcher.py").is_file():
            raise ConfigError(f"fault injection needs a fedmq checkout (it starts sites through the test launcher): "
                              f"{REPO_ROOT / 'tests' / 'launcher.py'} is missing")

    def command(self, name: str, args: list[str], env: dict[str, str]) -> list[str]:
        """The aggregator runs as shipped; a site runs through the launcher with its hooks."""
        if name == "aggregator":
            return super().command(name, args, env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        hooks = ["--record-plaintext", *self.extra_hooks.pop(name, [])]
        return [sys.executable, "-m", LAUNCHER_MODULE, *hooks, "--", *args]

    def append_config(self, name: str, values: dict[str, Any]) -> None:
        path = self.dir / "config" / f"{name}.toml"
        lines = []
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v) if isinstance(v, str) else ('true' if v is True else 'false' if v is False else repr(v))}")
        with open(path, "a") as fh:
            fh.write("\n".join(lines) + "\n")

    @property
    def local_node(self) -> Any:
        """The private node this federation started (fault injection restarts it)."""
        if self.node is None:
            raise FaultCheckFailed("fault injection needs the federation's own private node (amqp_url must be None)")
        return self.node

    @property
    def admin_url(self) -> str:
        return self.local_node.url_for_vhost(VHOST)

    def log_lines(self, name: str) -> list[dict[str, Any]]:
        path = self.dir / "logs" / f"{name}.log"
        out = []
        if not path.exists():
            return out
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def count_msg(self, name: str, prefix: str) -> int:
        return sum(1 for r in self.log_lines(name) if str(r.get("msg", "")).startswith(prefix))

    def site_state(self, site: str) -> dict[str, Any]:
        path = self.dir / "state" / site / "state.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}


def admin_link(url: str) -> AmqpLink:
    """An administrator's link through the transport seam (retried: the node may be restarting)."""
    return connect_link(url, attempts=20, name="fedmq-faults-admin")


#: a queue of the driver's own on the global fanout: every version message, for the weights check
OBSERVER_SPEC = topology.QueueSpec(OBSERVER_QUEUE, {"x-queue-type": "quorum"}, ((topology.GLOBAL_EXCHANGE, ""),))


def declare_observer(url: str) -> None:
    link = admin_link(url)
    try:
        link.declare((), (OBSERVER_SPEC,))
    finally:
        link.close()


def drain_observer(url: str) -> list[dict[str, Any]]:
    """Every global-version message the observer queue kept, reassembled per (version, mode, created_at)."""
    from fedmq.shared.codec import decode_global_version

    link = admin_link(url)
    parts: dict[tuple, dict[int, Any]] = {}
    done: list[dict[str, Any]] = []
    try:
        while (delivery := link.get(OBSERVER_QUEUE)) is not None:
            c = decode_global_version(delivery.body, max_bytes=64 << 20)
            key = (c.version, c.mode, c.created_at)
            parts.setdefault(key, {})[c.chunk_index] = c
            if len(parts[key]) == c.chunk_count:
                del parts[key]
                done.append({"version": c.version, "mode": c.mode, "contributors": [x.model_dump() for x in c.contributors]})
    finally:
        link.close()
    return done


def drain_dead_letters(url: str) -> Counter:
    link = admin_link(url)
    reasons: Counter = Counter()
    try:
        while (delivery := link.get(topology.DEAD_LETTER_QUEUE)) is not None:
            h = delivery.headers
            if topology.REASON_HEADER in h:
                reasons[str(h[topology.REASON_HEADER])] += 1
            else:  # dead-lettered by the broker itself (e.g. a bounded site queue dropping its oldest version)
                reasons[f"broker:{h.get('x-first-death-reason', '?')}:{h.get('x-first-death-queue', '?')}"] += 1
    finally:
        link.close()
    return reasons


