"""Fixtures that start real components once per session and clean up after themselves."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from operator_process import OperatorProcess
from pollinate_testbed import Testbed
from pollinate_testbed.testing import Kubectl


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    """The local control plane and S3 server: reused when `make up` left one running."""
    bed = Testbed()
    already_running = bed.is_running()
    bed.up()
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
    """A failing test that used the operator shows the operator's last log lines: in CI the
    log file is gone with the machine."""
    report = yield
    if report.failed:
        for op in getattr(item, "funcargs", {}).values():
            if isinstance(op, OperatorProcess):
                report.sections.append(("operator log (last 80 lines)",
                                        "\n".join(op.logs().splitlines()[-80:])))
    return report


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny pretrained Llama of tests/support/tiny_lm.py as a Hugging Face folder, built
    once per machine (cached under ~/.cache/pollinate/models, keyed by its recipe)."""
    from tiny_lm import cached_tiny_llama

    return cached_tiny_llama()


BUDGET_ENV = "POLLINATE_TEST_BUDGET_SECONDS"
_started = pytest.StashKey[float]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_started] = time.monotonic()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """With a time budget (CI sets one below its hard limit), stop between tests once it is
    spent: pytest then prints why each failed test failed, which a run killed from outside
    never does."""
    budget = float(os.environ.get(BUDGET_ENV) or 0)
    spent = time.monotonic() - item.config.stash[_started]
    if budget and nextitem is not None and spent > budget:
        item.session.shouldstop = (f"{BUDGET_ENV}={budget:g} s spent ({spent:.0f} s): the tests "
                                   "after this one did not run")
