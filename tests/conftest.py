"""Project-wide fixtures: one real RabbitMQ broker per session, one fresh vhost per test.

The broker is only started when a test asks for it, so unit tests pay nothing. Where no broker
can be had, tests that need one are skipped on a developer machine but FAIL in CI (``CI`` set
to true), so a broken CI setup cannot pass by skipping everything.

Subfolders add their own fixtures in their own ``conftest.py`` on top of these.
"""

from __future__ import annotations

import logging
import os
import time

# One intra-op thread for torch and BLAS, in this process and every service the tests start
# (they inherit the environment). The models under test are tiny; with pytest-xdist workers
# and the services' own processes sharing two cores, a second OpenMP thread per process only
# oversubscribes them: a small_cnn round measured 1.1 s with one thread and 9 s with two on a
# loaded 2-core machine. Set before torch is imported (conftest loads before any test module);
# an explicit setting in the environment wins.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
from collections.abc import Iterator
from typing import NoReturn

import pytest

from testkit.broker import Broker, BrokerUnavailableError, Namespace, open_test_broker
from testkit.zygote import Zygote

logger = logging.getLogger(__name__)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def broker_unavailable(reason: str) -> NoReturn:
    """Skip the current test, or fail it in CI, because the broker it needs is missing."""
    if _in_ci():
        pytest.fail(f"CI needs a broker: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core box: one intra-op thread avoids oversubscription stalls.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """The session's broker (private node, container, or ``FEDMQ_TEST_AMQP_URL``)."""
    started = time.monotonic()
    try:
        session_broker = open_test_broker()
    except BrokerUnavailableError as exc:
        broker_unavailable(str(exc))
    logger.info("broker %r ready in %.2fs", session_broker, time.monotonic() - started)
    with session_broker:
        yield session_broker


@pytest.fixture(scope="session")
def zygote() -> Iterator[Zygote]:
    """Forks the site agents and aggregators of federation and crash tests (and their test
    launcher) from one interpreter that imported torch, MONAI, Opacus and the aggregator once
    (``testkit.zygote``): each is still its own process."""
    z = Zygote()
    try:
        yield z
    finally:
        z.close()


@pytest.fixture
def broker_namespace(broker: Broker, request: pytest.FixtureRequest) -> Iterator[Namespace]:
    """A fresh vhost (or, on an unmanaged external broker, a unique name prefix) for this test.

    Created with one ``rabbitmqctl`` call; retired afterwards (no test uses it again) and
    deleted with the others when the session's broker closes, which saves two ``rabbitmqctl``
    calls (Erlang VM starts) per test."""
    namespace = broker.new_namespace(request.node.name)
    yield namespace
    broker.retire_namespace(namespace)


@pytest.fixture
def amqp_url(broker_namespace: Namespace) -> str:
    """AMQP URL of this test's own vhost; nothing else ever uses that vhost, and it is deleted
    (with everything in it) when the session's broker closes."""
    return broker_namespace.url


@pytest.fixture
def broker_ctl(broker: Broker) -> Broker:
    """The broker, for tests that restart it or run ``rabbitmqctl`` (users, permissions)."""
    if not (broker.can_restart and broker.can_rabbitmqctl):
        broker_unavailable(f"{broker!r} cannot be restarted or administered by the harness")
    return broker


#: unit modules of no ``slow`` test that still take 8-30 s in all (measured 2026-11-28), handed
#: out right after the slow modules so that none of them starts last and holds one worker while
#: the other has finished; a module missing from this list only runs later
LONG_UNIT_MODULES = (
    "tests/unit/test_dp_presets.py",
    "tests/unit/test_bench_suite.py",
    "tests/unit/test_site_rounds.py",
    "tests/unit/test_deploy_files.py",
    "tests/unit/test_site_join.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the modules that hold a ``slow`` test first, then ``LONG_UNIT_MODULES``, each module
    kept whole.

    Under pytest-xdist (``make test``) the long federation and fault-injection files then start
    at once on both workers and the many short unit files fill in around them, instead of one
    long file starting last and holding the whole run. Order only; no test depends on it.
    """
    slow_modules = {item.nodeid.split("::", 1)[0] for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        module = item.nodeid.split("::", 1)[0]
        if module in slow_modules:
            return (0, 0)
        return (1, LONG_UNIT_MODULES.index(module)) if module in LONG_UNIT_MODULES else (2, 0)

    items.sort(key=rank)
