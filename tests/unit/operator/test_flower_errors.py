"""Which Flower control-API failures the operator treats as "not available now" (asked again
on the next pass, the status says so) rather than as an answer: no connection, or a 5xx. A
SuperLink answers 500 when its SQLite state is locked by a burst of sites; CI met one."""

from __future__ import annotations

import httpx
import pytest
from pollinate_operator.clients.flower import FlowerControl, FlowerRefused, FlowerUnavailable


class Raising:
    """Flower's ControlHttpClient in the one respect tested here: the call raises `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __getattr__(self, method: str):
        def call(_request: object) -> None:
            raise self.error
        return call

    def close(self) -> None:
        pass


def control_raising(error: Exception) -> FlowerControl:
    control = FlowerControl.__new__(FlowerControl)
    control.address = "clinical-notes-server.default.svc:9092"
    control._client = Raising(error)
    return control


def http_status(code: int, body: str = "") -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://superlink:9092/v1/control/list-runs")
    response = httpx.Response(code, request=request, text=body)
    return httpx.HTTPStatusError(f"Server error '{code}' for url '{request.url}'",
                                 request=request, response=response)


@pytest.mark.parametrize("error", [
    http_status(500), http_status(503),
    httpx.ConnectError("[Errno 111] Connection refused"),
    httpx.ReadTimeout("timed out"),
])
def test_no_connection_or_a_server_error_is_unavailable_naming_the_server(error: Exception) -> None:
    with pytest.raises(FlowerUnavailable, match="clinical-notes-server"):
        control_raising(error).list_runs()


def test_a_client_error_is_an_answer_not_an_outage() -> None:
    with pytest.raises(httpx.HTTPStatusError):
        control_raising(http_status(409)).list_runs()
    # A run the server does not have (a restarted server that lost its state) is None.
    assert control_raising(http_status(404)).get_run(7) is None


@pytest.mark.parametrize("code", [401, 403])
def test_a_refused_token_is_named_with_the_servers_reason(code: int) -> None:
    reason = "pollinate server: the control API is the operator's: this token is not its token"
    with pytest.raises(FlowerRefused, match="refused the operator's control token: pollinate server"):
        control_raising(http_status(code, reason)).list_runs()
