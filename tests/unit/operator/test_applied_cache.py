"""Which applies the operator skips (clients/kube.AppliedCache): pure bookkeeping, a fake clock
and a list standing in for the API server."""

from __future__ import annotations

import pytest
from pollinate_operator.clients.kube import AppliedCache


def service(port: int = 9092, name: str = "fl-server") -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "research"},
            "spec": {"ports": [{"port": port}]}}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sent() -> list[dict]:
    return []


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> AppliedCache:
    return AppliedCache(max_age=300, clock=clock)


def test_the_same_object_is_sent_once(cache: AppliedCache, sent: list[dict]) -> None:
    assert cache.apply(service(), sent.append)
    assert not cache.apply(service(), sent.append)
    assert len(sent) == 1


def test_a_changed_desired_object_is_sent_again(cache: AppliedCache, sent: list[dict]) -> None:
    cache.apply(service(9092), sent.append)
    assert cache.apply(service(9093), sent.append)
    assert [s["spec"]["ports"][0]["port"] for s in sent] == [9092, 9093]


def test_objects_are_told_apart_by_identity(cache: AppliedCache, sent: list[dict]) -> None:
    cache.apply(service(name="a"), sent.append)
    assert cache.apply(service(name="b"), sent.append)


def test_a_child_a_watch_saw_change_is_sent_again(cache: AppliedCache, sent: list[dict]) -> None:
    cache.apply(service(), sent.append)
    # What a watch event carries: the live object, whatever it holds now.
    live = service() | {"status": {"loadBalancer": {}}}
    cache.forget(live)
    assert cache.apply(service(), sent.append)


def test_nothing_is_trusted_longer_than_max_age(cache: AppliedCache, sent: list[dict],
                                                clock: Clock) -> None:
    cache.apply(service(), sent.append)
    clock.now = 299
    assert not cache.apply(service(), sent.append)
    clock.now = 301
    assert cache.apply(service(), sent.append)


def test_a_failed_send_is_not_remembered(cache: AppliedCache, sent: list[dict]) -> None:
    def refuse(body: dict) -> None:
        raise ConnectionError("API server unavailable")

    with pytest.raises(ConnectionError):
        cache.apply(service(), refuse)
    assert cache.apply(service(), sent.append)


def test_a_change_seen_while_the_request_is_in_flight_is_not_overwritten(
        cache: AppliedCache, sent: list[dict]) -> None:
    def send_then_watch_sees_a_delete(body: dict) -> None:
        sent.append(body)
        cache.forget(body)

    cache.apply(service(), send_then_watch_sees_a_delete)
    assert cache.apply(service(), sent.append)
