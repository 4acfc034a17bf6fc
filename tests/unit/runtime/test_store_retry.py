"""The store's pure logic: which S3 failures are retried, the backoff budget, the JSON formats.
(The store against a real S3 server is tests/integration/test_store_s3.py.)"""

from __future__ import annotations

import botocore.exceptions
import pytest
from pollinate_runtime.store import (
    RetryPolicy,
    RunProgress,
    StoreUnavailable,
    call_with_retry,
    is_transient,
    lora_adapter_config,
)


def client_error(status: int, code: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


class FakeClock:
    """Time that passes only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "error",
    [
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        botocore.exceptions.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
        botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        botocore.exceptions.ConnectionClosedError(endpoint_url="http://127.0.0.1:1"),
        client_error(500, "InternalError"),
        client_error(503, "ServiceUnavailable"),
        client_error(503, "SlowDown"),
    ],
)
def test_network_failures_and_server_errors_are_retried(error):
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [client_error(403, "AccessDenied"), client_error(404, "NoSuchBucket"),
     client_error(412, "PreconditionFailed"), client_error(501, "NotImplemented"),
     ValueError("not an S3 error")],
)
def test_client_mistakes_are_not_retried(error):
    assert not is_transient(error)


def test_a_failing_call_is_retried_with_growing_backoff_until_it_succeeds():
    clock = FakeClock()
    failures = [client_error(503, "ServiceUnavailable")] * 5

    def operation() -> str:
        if failures:
            raise failures.pop()
        return "written"

    policy = RetryPolicy(deadline_seconds=60, first_backoff_seconds=0.2, max_backoff_seconds=2)
    assert call_with_retry(operation, what="S3 PUT x", policy=policy, sleep=clock.sleep,
                           clock=clock) == "written"
    assert len(clock.sleeps) == 5
    # Full jitter in [backoff/2, backoff], backoff doubling up to the cap.
    for pause, backoff in zip(clock.sleeps, [0.2, 0.4, 0.8, 1.6, 2.0], strict=True):
        assert backoff / 2 <= pause <= backoff


def test_retrying_stops_at_the_deadline_and_names_the_operation():
    clock = FakeClock()

    def operation() -> None:
        raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3.example:9000")

    with pytest.raises(StoreUnavailable) as caught:
        call_with_retry(operation, what="S3 PUT s3://b/p/k at http://s3.example:9000",
                        policy=RetryPolicy(deadline_seconds=30), sleep=clock.sleep, clock=clock)
    message = str(caught.value)
    assert "S3 PUT s3://b/p/k at http://s3.example:9000" in message
    assert "within 30 s" in message and "Could not connect" in message
    assert 30 <= clock.now <= 30.001


def test_a_non_transient_error_is_raised_at_once():
    clock = FakeClock()

    def operation() -> None:
        raise client_error(403, "AccessDenied")

    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        call_with_retry(operation, what="S3 GET", policy=RetryPolicy(), sleep=clock.sleep,
                        clock=clock)
    assert clock.sleeps == []


def test_run_progress_is_camel_case_json_that_round_trips():
    progress = RunProgress(
        training_round="notes-v1", round=2, total_rounds=5,
        rounds=[{"round": 1, "participants": 3, "trainLoss": 2.1}],
        sites={"hospital-a": {"state": "Training", "lastRound": 2}},
        last_checkpoint="s3://pollinate/p/checkpoints/notes-v1/round-2/manifest.json",
    )
    value = progress.to_json()
    assert {"trainingRound", "totalRounds", "lastCheckpoint", "adapterVersion", "updatedAt"} <= (
        value.keys()
    )
    back = RunProgress.from_json(value)
    assert back.round == 2 and back.sites == progress.sites and back.rounds == progress.rounds


def test_adapter_config_names_lora_and_the_base_model_as_peft_does():
    config = lora_adapter_config(
        "HuggingFaceTB/SmolLM2-135M-Instruct", rank=16, alpha=32, dropout=0.05,
        target_modules=("v_proj", "q_proj"), revision="main",
    )
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 16 and config["lora_alpha"] == 32 and config["lora_dropout"] == 0.05
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["inference_mode"] is True  # as save_pretrained writes it
