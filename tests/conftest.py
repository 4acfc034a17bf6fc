"""Fixtures that start real components once per session and clean up after themselves."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import process_logs
import pytest
from operator_process import OperatorProcess
from pollinate_testbed import Testbed
from pollinate_testbed.testing import Kubectl
from run_times import RunTimes


@pytest.fixture(scope="session")
def testbed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    """The local control plane and S3 server: reused when `make up` left one running."""
    bed = Testbed()
    already_running = bed.is_running()
    started = time.monotonic()
    bed.up(log=lambda _: None)
    RunTimes.of(request.config).phases["cluster start (simulated nodes)"] = time.monotonic() - started
    yield bed
    if not already_running and not os.environ.get("POLLINATE_KEEP_TESTBED"):
        bed.down(quiet=True)


@pytest.fixture
def namespace(testbed: Testbed) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (its objects go with it)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    Kubectl(testbed).run("create", "namespace", name)
    yield name
    Kubectl(testbed).run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def kubectl(testbed: Testbed, namespace: str) -> Kubectl:
    return Kubectl(testbed, namespace)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def crds(testbed: Testbed) -> None:
    k = Kubectl(testbed)
    k.run("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    for name in ("federations.pollinate.dev", "trainingrounds.pollinate.dev"):
        k.run("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


@pytest.fixture(scope="module")
def operator(testbed: Testbed, crds: None, tmp_path_factory) -> Iterator[OperatorProcess]:
    op = OperatorProcess(testbed, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failing test shows the last log lines of the operator it used and of the Flower
    processes (servers, sites) that wrote to their logs while it ran: in CI the files are gone
    with the machine."""
    report = yield
    if report.failed:
        for op in getattr(item, "funcargs", {}).values():
            if isinstance(op, OperatorProcess):
                report.sections.append(("operator log (last 80 lines, without its timers' "
                                        "successes)", process_logs.tail(op.logs(), 80)))
        for log in process_logs.written_since(item.stash.get(TEST_STARTED, 0.0)):
            report.sections.append((f"{log.parent.name}/{log.name} (last 60 lines)",
                                    process_logs.tail(log.read_text(errors="replace"), 60)))
    return report


TEST_STARTED = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[TEST_STARTED] = time.time()


def pytest_runtest_logstart(nodeid: str) -> None:
    # For tools/cpu_by_test.py: which test each pytest process was running when, so the CPU of
    # the processes a test started (servers, sites, pods) is charged to it.
    if trace := os.environ.get("POLLINATE_TEST_TRACE"):
        with open(trace, "a") as f:
            f.write(f"{time.time():.2f} {os.getpid()} {nodeid}\n")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny pretrained Llama of tests/support/tiny_lm.py as a Hugging Face folder, built
    once per machine (cached under ~/.cache/pollinate/models, keyed by its recipe)."""
    from tiny_lm import cached_tiny_llama

    return cached_tiny_llama()


DEADLINE_ENV = "POLLINATE_TEST_DEADLINE"


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """With a deadline (CI sets one, as a Unix time, below its hard limit), stop between tests
    once it has passed: pytest then prints why each failed test failed, which a run killed from
    outside never does."""
    deadline = float(os.environ.get(DEADLINE_ENV) or 0)
    if deadline and nextitem is not None and time.time() > deadline:
        item.session.shouldstop = (f"{DEADLINE_ENV} passed {time.time() - deadline:.0f} s ago: the "
                                   "tests after this one did not run")



# Modules that `make test` (tools/test.sh) runs in a lane of their own, each on a testbed of
# its own, beside the main lane: the engine's tests and the operator's with a real Flower
# server are the longest modules and spend much of their time waiting on rounds, restarts and
# timeouts, which the other lanes' work fills.
LANES = {"engine": ("tests/integration/test_engine.py", "tests/integration/test_operator_flower.py")}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--lane", choices=["main", *LANES], default=None,
                     help="run only this lane's share of the selected tests (tools/test.sh): a "
                          "named lane its modules, main every other")


def lane_of(item: pytest.Item) -> str:
    path = item.nodeid.split("::")[0]
    return next((lane for lane, modules in LANES.items() if path in modules), "main")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(RunTimes(), RunTimes.NAME)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fast modules first, then the modules marked slow as a whole, then the tests that run
    pods for real (their testbed needs Traefik, which `make test` builds meanwhile). `make test`
    runs the last group in a second lane beside the others (tools/test.sh): the fast modules,
    mostly waiting on the cluster, are what that lane first runs beside. Within a group the
    order is kept, so module fixtures are set up once."""
    def slow_module(item: pytest.Item) -> bool:
        marks = getattr(item.module, "pytestmark", [])
        return any(m.name == "slow" for m in (marks if isinstance(marks, list) else [marks]))

    items.sort(key=lambda item: (item.get_closest_marker("execute") is not None, slow_module(item)))
    lane = config.getoption("--lane")
    if lane:
        elsewhere = [item for item in items if lane_of(item) != lane]
        if elsewhere:
            config.hook.pytest_deselected(items=elsewhere)
            items[:] = [item for item in items if lane_of(item) == lane]
