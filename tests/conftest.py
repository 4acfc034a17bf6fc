"""Fixtures that start real components once per session and clean up after themselves."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
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
