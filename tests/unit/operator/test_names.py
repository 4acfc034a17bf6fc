"""Names derived from a Federation's or TrainingRound's name fit Kubernetes' limits and never
collide, up to the longest names Kubernetes allows (pure logic of manifests/names.py)."""

from __future__ import annotations

import re

import pytest
from pollinate_operator.manifests import names

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
SITES = ("hospital-a", "hospital-b", "clinic-c", "s" * 63)


def long_name(length: int, tail: str = "") -> str:
    base = ("notes-" * 60)[: length - len(tail)]
    return (base.rstrip("-") + tail).ljust(length, "x")


@pytest.mark.parametrize("length", [14, 52, 60, 63, 64, 250, 253])
def test_every_derived_name_fits_its_limit_and_form(length: int) -> None:
    federation = training_round = long_name(length)
    assert len(names.server(federation)) <= 63 and DNS_1035.match(names.server(federation))
    for secret in (names.server_tls_secret(federation), names.ca_secret(federation),
                   names.control_token_secret(federation),
                   *(names.site_secret(federation, s) for s in SITES)):
        assert len(secret) <= 253 and SUBDOMAIN.match(secret), secret
    for site in SITES:
        job = names.client_job(training_round, site)
        assert len(job) <= 52 and DNS_LABEL.match(job), job
        for value in names.client_labels(federation, training_round, site).values():
            assert len(value) <= 63 and LABEL_VALUE.match(value), value
    for value in names.server_labels(federation).values():
        assert len(value) <= 63 and LABEL_VALUE.match(value), value


@pytest.mark.parametrize("length", [60, 250])
def test_long_names_that_share_a_prefix_derive_different_children(length: int) -> None:
    first, second = long_name(length, "-one"), long_name(length, "-two")
    assert first[:50] == second[:50]
    jobs = {names.client_job(tr, site) for tr in (first, second) for site in SITES}
    assert len(jobs) == 2 * len(SITES), "two client Jobs would share a name"
    assert names.server(first) != names.server(second)
    assert names.label_value(first) != names.label_value(second)
    assert names.training_round_selector(first) != names.training_round_selector(second)


def test_a_name_that_fits_is_kept_as_it_is_and_the_same_name_derives_the_same_children() -> None:
    assert names.server("clinical-notes") == "clinical-notes-server"
    assert names.client_job("notes-v1", "hospital-a") == "notes-v1-hospital-a"
    long = long_name(250)
    assert names.client_job(long, "hospital-a") == names.client_job(long, "hospital-a")
    assert names.site_secrets_selector(long) == (
        f"{names.FEDERATION_LABEL}={names.client_labels(long, 'r', 's')[names.FEDERATION_LABEL]},"
        f"{names.SITE_LABEL}")
